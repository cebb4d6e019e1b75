"""The core loop on real Redis, with SQLite and PostgreSQL stores: plain redis-py producers,
owner inboxes, the store, dead-letter streams, redelivery and crash recovery."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from decision_router import pipeline as pipeline_module
from decision_router.audit import alert_story
from decision_router.contracts import Alert
from decision_router.keys import Keys
from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord, RejectionRecord
from decision_router.tracker import alert_id_for
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.redis


def prediction(pid: str, **overrides) -> dict:
    document = {
        "prediction_id": pid,
        "model": "churn",
        "model_version": "2026.11",
        "entity_type": "account",
        "entity_id": f"acct-{pid}",
        "score": 0.93,
        "predicted_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        "features": {"top_drivers": ["usage_drop", "champion_left"]},
        "context": {"segment": "enterprise", "account_manager": "alice-moreau", "arr": 120000, "renewal_date": "2027-02-01"},
    }
    document.update(overrides)
    return document


def flat_fields(document: dict) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                fields[f"{key}.{sub}"] = json.dumps(subvalue) if isinstance(subvalue, list) else str(subvalue)
        else:
            fields[key] = str(value)
    return fields


def count(engine, table, *where) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(table).where(*where)) or 0


def inbox(r, keys: Keys, owner: str) -> list[Alert]:
    return [Alert.model_validate_json(fields["data"]) for _, fields in r.xrange(keys.inbox(owner))]


@pytest.mark.parametrize("form", ["data-json", "flat-fields"])
async def test_plain_redis_producer_reaches_owner_inbox_and_store(service, r, engine, form) -> None:
    keys = service.keys
    document = prediction("p1")
    fields = {"data": json.dumps(document)} if form == "data-json" else flat_fields(document)
    r.xadd(keys.predictions, fields)

    await wait_until(lambda: r.xlen(keys.inbox("alice-moreau")) == 1, what="the alert in alice-moreau's inbox")
    (alert,) = inbox(r, keys, "alice-moreau")
    assert alert.alert_id == alert_id_for("p1", "enterprise-churn-risk")
    assert (alert.rule, alert.owner, alert.owner_source, alert.priority) == ("enterprise-churn-risk", "alice-moreau", "field", "high")
    assert alert.context["context.renewal_date"] == "2027-02-01"
    assert alert.rules_version == service.pipeline.ruleset.version
    assert alert.ack_by - alert.created_at == timedelta(hours=2)
    assert alert.act_by - alert.created_at == timedelta(hours=24)

    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.delivered_at.is_not(None)) == 1, what="delivery recorded")
    with Session(engine) as session:
        record = session.get(AlertRecord, alert.alert_id)
        assert record is not None and record.owner == "alice-moreau" and record.rule == "enterprise-churn-risk"
        stored = session.get(PredictionRecord, "p1")
        assert stored is not None and stored.document["context"]["segment"] == "enterprise"
        types = set(session.scalars(select(AuditEvent.type).where(AuditEvent.prediction_id == "p1")))
        story = alert_story(session, alert.alert_id)
    assert types == {"routed", "delivered"}  # "received" is the prediction row itself
    assert story is not None and [e.type for e in story.events] == ["received", "routed", "delivered"]
    await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="all acknowledged")


async def test_bad_input_lands_in_dlq_with_reason_and_is_counted(service, r, engine) -> None:
    keys = service.keys
    r.xadd(keys.predictions, {"data": "{not json"})
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-range", score=1.5))})
    r.xadd(keys.predictions, flat_fields(prediction("p-noid", entity_id="")))
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-old", predicted_at="2020-01-01T00:00:00Z"))})
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-ok"))})

    await wait_until(lambda: r.xlen(keys.predictions_dlq) == 4, what="4 DLQ entries")
    dead = {fields["reason"]: fields for _, fields in r.xrange(keys.predictions_dlq)}
    assert set(dead) == {"invalid_json", "score_out_of_range", "missing_id", "stale"}
    assert json.loads(dead["invalid_json"]["payload"]) == {"data": "{not json"}
    assert dead["score_out_of_range"]["model"] == "churn"
    assert "1.5" in dead["score_out_of_range"]["detail"]
    await wait_until(lambda: count(engine, RejectionRecord) == 4, what="rejections counted")
    with Session(engine) as session:
        by_reason = dict(session.execute(
            select(RejectionRecord.reason, RejectionRecord.model).where(RejectionRecord.source_stream == keys.predictions)
        ).all())
    assert by_reason == {"invalid_json": None, "score_out_of_range": "churn", "missing_id": "churn", "stale": "churn"}
    assert count(engine, PredictionRecord) == 1
    await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="all acknowledged")


async def test_same_prediction_id_twice_is_a_duplicate_not_a_second_alert(service, r, engine) -> None:
    keys = service.keys
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-dup"))})
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-dup", score=0.99))})
    await wait_until(lambda: r.xlen(keys.predictions_dlq) == 1, what="the duplicate in the DLQ")
    (_, dead), = r.xrange(keys.predictions_dlq)
    assert dead["reason"] == "duplicate"
    assert json.loads(json.loads(dead["payload"])["data"])["score"] == 0.99
    # The inbox is written after the DLQ within a batch: wait for the batch to finish.
    await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="both entries acked")
    assert r.xlen(keys.inbox("alice-moreau")) == 1
    assert count(engine, AlertRecord) == 1


async def test_redelivered_entry_creates_no_duplicate(service, r, engine) -> None:
    """The same stream entry processed twice (a crash before XACK) is not a duplicate either."""
    keys = service.keys
    entry_id = r.xadd(keys.predictions, {"data": json.dumps(prediction("p-re"))})
    await wait_until(lambda: r.xlen(keys.inbox("alice-moreau")) == 1, what="first delivery")
    fields = {b"data": r.xrange(keys.predictions, entry_id, entry_id)[0][1]["data"].encode()}
    result = await service.pipeline.process_predictions([(entry_id, fields)])
    assert (result.accepted, result.redelivered, result.rejected) == (0, 1, {})
    assert r.xlen(keys.inbox("alice-moreau")) == 1
    assert r.xlen(keys.predictions_dlq) == 0
    assert count(engine, AlertRecord) == 1
    assert count(engine, AuditEvent, AuditEvent.type == "delivered") == 1


async def test_crash_between_commit_and_inbox_write_is_recovered_once(service, r, engine, monkeypatch) -> None:
    """The classic duplicate: alert committed, inbox write fails, entry redelivered."""
    keys = service.keys
    real_xadd_once = pipeline_module.xadd_once
    failures = []

    async def flaky(redis, writes, *, ttl, wait):
        if writes and writes[0].stream.startswith(keys.inbox("")) and not failures:
            failures.append(writes)
            raise ConnectionError("simulated crash before the inbox write")
        return await real_xadd_once(redis, writes, ttl=ttl, wait=wait)

    monkeypatch.setattr(pipeline_module, "xadd_once", flaky)
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-crash"))})
    await wait_until(lambda: bool(failures), what="the simulated crash")
    assert count(engine, AlertRecord) == 1  # committed before the crash
    # The entry stayed pending; the reclaimer takes it after claim_idle and finishes it.
    await wait_until(lambda: r.xlen(keys.inbox("alice-moreau")) == 1, what="recovery")
    await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="ack after recovery")
    assert r.xlen(keys.inbox("alice-moreau")) == 1
    assert r.xlen(keys.predictions_dlq) == 0
    assert count(engine, AlertRecord) == 1


async def test_reclaim_from_a_consumer_that_died_holding_entries(settings, ruleset, engine, r) -> None:
    from redis.asyncio import Redis

    from decision_router.service import ensure_group, running_service

    keys = Keys(settings.stream_prefix)
    client = Redis.from_url(settings.effective_redis_url)
    await ensure_group(client, keys.predictions, settings.consumer_group)
    await client.aclose()
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-held"))})
    taken = r.xreadgroup(settings.consumer_group, "dead-worker", {keys.predictions: ">"}, count=10)
    assert len(taken[0][1]) == 1
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: r.xlen(keys.inbox("alice-moreau")) == 1, what="the held entry to be reclaimed")
        await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="ack")
    assert count(engine, AlertRecord) == 1


async def test_backlog_published_before_start_is_routed(settings, ruleset, engine, r) -> None:
    from decision_router.service import running_service

    keys = Keys(settings.stream_prefix)
    for n in range(120):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"p-back-{n}", entity_id=f"acct-{n}"))})
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: count(engine, PredictionRecord) == 120, what="the backlog", timeout=20)
        await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="acks")
    assert r.xlen(keys.inbox("alice-moreau")) == 120


async def test_outbox_is_drained_at_start(settings, ruleset, engine, r) -> None:
    """An alert committed by a worker that died before writing it is delivered on restart."""
    from decision_router.service import running_service

    keys = Keys(settings.stream_prefix)
    async with running_service(settings, ruleset, engine):
        r.xadd(keys.predictions, {"data": json.dumps(prediction("p-out"))})
        await wait_until(lambda: r.xlen(keys.inbox("alice-moreau")) == 1, what="delivery")
    # Forget the delivery (as if the worker died right after commit) and remove the inbox entry.
    alert_id = alert_id_for("p-out", "enterprise-churn-risk")
    with Session(engine) as session:
        record = session.get(AlertRecord, alert_id)
        record.delivered_at = None
        session.add(record)
        session.commit()
    r.delete(keys.inbox("alice-moreau"), keys.dedupe(f"alert:{alert_id}:alice-moreau"))
    async with running_service(settings, ruleset, engine):
        await wait_until(lambda: r.xlen(keys.inbox("alice-moreau")) == 1, what="redelivery from the outbox")
    assert count(engine, AlertRecord, AlertRecord.delivered_at.is_not(None)) == 1
