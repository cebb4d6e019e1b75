"""Pipeline.process_outcomes on real Redis and both stores: an acknowledgement or intervention dated after its
alert's outcome, an entity outcome dated within the clock skew before its prediction, and a duplicate prediction's
detail."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from decision_router.pipeline import Pipeline
from decision_router.quality import bounded_detail
from decision_router.tables import AlertRecord, as_utc
from tests.integration.test_router_loop import prediction
from tests.unit.test_outcome_addressing import store, stored
from tests.unit.test_stats import alert

pytestmark = pytest.mark.redis

NOW = datetime.now(UTC).replace(microsecond=0)
CREATED = NOW - timedelta(days=2)
OUTCOME_AT = NOW - timedelta(days=1)


@pytest.fixture
async def pipeline(settings, ruleset, engine) -> AsyncIterator[Pipeline]:
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    yield Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=lambda: NOW)
    await redis.aclose()


def closed(n: int, *, prediction_id: str | None = None) -> AlertRecord:
    """A delivered alert created two days ago whose outcome came a day ago, never acknowledged."""
    record = alert(n, rule="churn", owner="alice-moreau", created=CREATED, outcome="success",
                   prediction_id=prediction_id)
    record.outcome_at = OUTCOME_AT
    return record


async def send(pipeline: Pipeline, event: dict, entry_id: str = "1-0"):
    return await pipeline.process_outcomes([(entry_id, {"data": json.dumps(event, default=str)})])


async def dead_letters(pipeline: Pipeline) -> list[tuple[str, str]]:
    return [(f["reason"], f["detail"]) for _, f in await pipeline.redis.xrange(pipeline.keys.outcomes_dlq)]


@pytest.mark.parametrize("type_", ["acknowledged", "intervened"])
async def test_an_ack_or_intervention_after_the_alerts_outcome_is_refused(pipeline, type_) -> None:
    """By alert id such an event was applied (by entity it was unknown_alert: only open alerts are addressed): the
    alert then counted as acted on, though the action came after its outcome, its time to act past it."""
    record = closed(1)
    store(pipeline, record)
    after = OUTCOME_AT + timedelta(hours=1)
    result = await send(pipeline, {"alert_id": record.alert_id, "type": type_, "actor": "alice-moreau",
                                   "action": "call", "at": after.isoformat()})
    assert (result.accepted, result.newly_rejected) == (0, {"schema": 1})
    what = "acknowledgement" if type_ == "acknowledged" else "intervention"
    detail = (f"at {after.isoformat()} is after alert {record.alert_id}'s outcome ({OUTCOME_AT.isoformat()}): "
              f"an {what} after the outcome cannot have caused it")
    assert await dead_letters(pipeline) == [("schema", detail)]
    untouched = stored(pipeline, record.alert_id)
    assert untouched.acknowledged_at is None and untouched.intervened_at is None and untouched.intervention is None


async def test_an_ack_without_at_on_an_alert_closed_before_is_refused_as_now(pipeline) -> None:
    record = closed(1)
    store(pipeline, record)
    result = await send(pipeline, {"alert_id": record.alert_id, "type": "intervened", "actor": "alice-moreau"})
    assert result.newly_rejected == {"schema": 1}
    [(_, detail)] = await dead_letters(pipeline)
    assert detail.startswith(f"at {NOW.isoformat()} (now: the event gives no `at`) is after alert {record.alert_id}'s")
    assert stored(pipeline, record.alert_id).intervened_at is None


@pytest.mark.parametrize("type_", ["acknowledged", "intervened"])
async def test_an_ack_or_intervention_dated_before_the_outcome_and_reported_late_is_applied(pipeline, type_) -> None:
    record = closed(1)
    store(pipeline, record)
    before = OUTCOME_AT - timedelta(hours=1)
    result = await send(pipeline, {"alert_id": record.alert_id, "type": type_, "actor": "alice-moreau",
                                   "at": before.isoformat()})
    assert result.accepted == 1 and result.rejected == {}
    applied = stored(pipeline, record.alert_id)
    assert as_utc(applied.acknowledged_at) == before
    assert (as_utc(applied.intervened_at) == before) if type_ == "intervened" else applied.intervened_at is None


async def test_by_prediction_an_ack_after_one_decisions_outcome_applies_to_the_others_only(pipeline) -> None:
    """As by entity, where only open decisions are addressed: the one with an earlier outcome is left alone."""
    done = closed(1, prediction_id="p-both")
    still_open = alert(2, rule="watch", owner="alice-moreau", created=CREATED, prediction_id="p-both")
    store(pipeline, done, still_open)
    at = OUTCOME_AT + timedelta(hours=1)
    result = await send(pipeline, {"prediction_id": "p-both", "type": "acknowledged", "actor": "alice-moreau",
                                   "at": at.isoformat()})
    assert result.accepted == 1 and result.rejected == {}
    assert stored(pipeline, done.alert_id).acknowledged_at is None
    assert as_utc(stored(pipeline, still_open.alert_id).acknowledged_at) == at


async def test_an_entity_outcome_dated_within_the_clock_skew_before_its_prediction_applies(pipeline) -> None:
    """The lookup by entity required predicted_at <= at: refused as unknown_alert, where the same event naming
    its alert applied (the clock skew allowed for)."""
    skew = pipeline.settings.max_clock_skew
    predicted = NOW - timedelta(hours=1)
    record = alert(1, rule="churn", owner="alice-moreau", created=predicted)
    beyond = alert(2, rule="churn", owner="alice-moreau", created=predicted)
    store(pipeline, record, beyond)
    event = {"entity_type": "account", "type": "outcome", "result": "success", "actor": "crm"}
    result = await send(pipeline, {**event, "entity_id": record.entity_id, "at": (predicted - skew / 2).isoformat()})
    assert result.accepted == 1 and result.rejected == {}, result.rejections
    assert stored(pipeline, record.alert_id).outcome == "success"
    # Beyond the skew it is still no outcome of that prediction.
    result = await send(pipeline, {**event, "entity_id": beyond.entity_id,
                                   "at": (predicted - 2 * skew).isoformat()}, entry_id="2-0")
    assert result.newly_rejected == {"unknown_alert": 1}
    assert stored(pipeline, beyond.alert_id).outcome is None


async def test_a_duplicate_predictions_detail_is_bounded_like_the_others(pipeline) -> None:
    """The detail quoted the prediction_id as sent, where every other detail (the gate's, unknown_alert's "no alert
    for prediction ...") goes through bounded_detail: a 200-digit id was quoted whole, digit by digit."""
    pid = "1" * 200
    document = prediction(pid, entity_id="acct-dup")
    first = await pipeline.process_predictions([("1-0", {"data": json.dumps(document)})])
    assert first.accepted == 1
    again = await pipeline.process_predictions([("2-0", {"data": json.dumps(document)})])
    [rejection] = again.rejections
    assert rejection.reason.value == "duplicate"
    assert rejection.detail == f"prediction_id {'1' * 20}… (200 digits) was already accepted from entry 1-0"
    assert rejection.detail == bounded_detail(f"prediction_id {pid} was already accepted from entry 1-0")
    [(_, fields)] = await pipeline.redis.xrange(pipeline.keys.predictions_dlq)
    assert fields["detail"] == rejection.detail
