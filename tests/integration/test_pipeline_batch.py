"""The batched hot path on real Redis and both stores: one batch holding repeats of an
entity (cooldowns started inside the batch and stored by earlier ones), redelivery of a
whole batch, lookups only for predictions whose routing reads them, and one conditional
UPDATE marking a batch delivered."""

from __future__ import annotations

import gc
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlmodel import Session
from structlog.testing import capture_logs

from decision_router import tracker
from decision_router.audit import alert_story, entity_story
from decision_router.pipeline import Pipeline
from decision_router.rules import load_rules
from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord, as_utc
from decision_router.tracker import alert_id_for
from tests.integration.conftest import ManualClock
from tests.integration.test_router_loop import count

pytestmark = pytest.mark.redis

ROUTING = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
rules:
  - name: churn-high
    when: {model: churn, score: {gte: 0.8}}
    owner: am
    cooldown: 1d
  - name: upsell
    when: {model: upsell}
    owner: am
    context: [lookup.crm.tier]
  - {name: rest, when: {}, owner: desk, action: record}
"""
OWNERS = "owners:\n  - {id: am, name: Account Manager}\n  - {id: desk, name: Desk}\n"
T0 = datetime.now(UTC).replace(microsecond=0)


class CountingEnricher:
    """Records which predictions the pipeline asked to look up; returns a fixed tier."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def lookup(self, predictions):
        self.asked.extend(p.prediction_id for p in predictions)
        return {p.prediction_id: {"crm": {"tier": "gold"}} for p in predictions}


@pytest.fixture
async def pipeline(settings, engine, tmp_path: Path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "routing.yaml").write_text(ROUTING)
    (rules / "owners.yaml").write_text(OWNERS)
    redis = Redis.from_url(settings.redis_url)
    built = Pipeline(settings=settings, ruleset=load_rules(rules), engine=engine, redis=redis, clock=ManualClock(T0))
    built.enricher = CountingEnricher()
    yield built
    await redis.aclose()


def entry(n: int, pid: str, entity: str, *, model: str = "churn", score: float = 0.9,
          at: datetime = T0) -> tuple[str, dict]:
    document = {"prediction_id": pid, "model": model, "model_version": "1", "entity_type": "account",
                "entity_id": entity, "score": score, "predicted_at": at.isoformat()}
    return f"{n}-0", {"data": json.dumps(document)}


def inbox(r, pipeline: Pipeline, owner: str) -> list[dict]:
    return [json.loads(fields["data"]) for _, fields in r.xrange(pipeline.keys.inbox(owner))]


async def test_one_batch_suppresses_repeats_of_an_entity_and_a_redelivery_changes_nothing(pipeline, engine, r):
    batch = [entry(1, "p1", "a"), entry(2, "p2", "a"), entry(3, "p3", "b"), entry(4, "p4", "a", score=0.1),
             entry(5, "p5", "c", model="upsell")]
    result = await pipeline.process_predictions(batch)
    assert (result.accepted, result.alerts, result.suppressed, result.recorded, result.delivered) == (5, 3, 1, 1, 3)
    with Session(engine) as session:
        repeat = session.get(AlertRecord, alert_id_for("p2", "churn-high"))
        assert repeat.suppressed_by == alert_id_for("p1", "churn-high") and repeat.status == "suppressed"
        assert repeat.delivered_at is None and repeat.ack_due_at is None
        first = session.get(AlertRecord, alert_id_for("p1", "churn-high"))
        assert first.delivered_at is not None and as_utc(first.ack_due_at) == T0 + timedelta(hours=4)
        story = session.scalars(select(AuditEvent).where(AuditEvent.prediction_id == "p1").order_by(AuditEvent.id)).all()
        assert [e.type for e in story] == ["routed", "delivered"]
        # Bulk-inserted rows read back as the ORM wrote them: JSON, timestamps, booleans.
        assert story[0].detail["rule"] == "churn-high" and story[0].detail["cooldown_s"] == 86400.0
        assert as_utc(story[0].at) == T0
        stored_prediction = session.get(PredictionRecord, "p1")
        assert stored_prediction.document["entity_id"] == "a" and as_utc(stored_prediction.predicted_at) == T0
        assert first.held_out is False and first.missing_context == [] and first.context == {}
    assert sorted(a["prediction_id"] for a in inbox(r, pipeline, "am")) == ["p1", "p3", "p5"]
    # Only the upsell prediction reaches a rule that reads looked-up context.
    assert pipeline.enricher.asked == ["p5"]
    assert next(a for a in inbox(r, pipeline, "am") if a["prediction_id"] == "p5")["context"] == {
        "lookup.crm.tier": "gold"}

    again = await pipeline.process_predictions(batch)  # the same entries: a crash before the ack
    assert (again.accepted, again.redelivered, again.delivered) == (0, 5, 0)
    assert count(engine, PredictionRecord) == 5 and count(engine, AlertRecord) == 5
    assert count(engine, AuditEvent) == 5 + 3  # decisions and deliveries; "received" is the prediction row
    assert len(inbox(r, pipeline, "am")) == 3


async def test_no_received_row_is_stored_yet_the_stories_show_it_once_in_its_place(pipeline, engine):
    batch = [entry(1, "p1", "a"), entry(2, "p2", "a"), entry(3, "p3", "b"), entry(4, "p4", "a", score=0.1)]
    await pipeline.process_predictions(batch)
    assert count(engine, AuditEvent, AuditEvent.type == "received") == 0
    received_p1 = {"at": T0.isoformat().replace("+00:00", "Z"), "type": "received", "actor": "decision-router",
                   "alert_id": None,
                   "prediction_id": "p1", "summary": "prediction p1 received (model churn, score 0.9)",
                   "detail": {"stream_id": "1-0", "model": "churn", "score": 0.9}}
    first, repeat = alert_id_for("p1", "churn-high"), alert_id_for("p2", "churn-high")
    with Session(engine) as session:
        events = alert_story(session, first).as_dict()["events"]
        assert [e["type"] for e in events] == ["received", "routed", "delivered"]
        assert events[0] == received_p1
        entity = entity_story(session, "account", "a").as_dict()
    # One batch, one instant: the order the events were written in when "received" was stored.
    assert [(e["type"], e["prediction_id"]) for e in entity["events"]] == [
        ("received", "p1"), ("routed", "p1"), ("received", "p2"), ("suppressed", "p2"),
        ("received", "p4"), ("recorded", "p4"), ("delivered", "p1"),
    ]
    assert entity["events"][0] == received_p1
    by_alert = {a["alert"]["alert_id"]: [e["type"] for e in a["events"]] for a in entity["alerts"]}
    assert by_alert[first] == ["received", "routed", "delivered"]
    assert by_alert[repeat] == ["received", "suppressed"]


async def test_cooldowns_stored_by_earlier_batches_hold_until_they_expire(pipeline, engine, r):
    await pipeline.process_predictions([entry(1, "q1", "a"), entry(2, "q2", "b")])
    pipeline.clock.now = at = T0 + timedelta(hours=23)
    later = await pipeline.process_predictions([entry(3, "q3", "a", at=at), entry(4, "q4", "c", at=at)])
    assert (later.alerts, later.suppressed) == (1, 1)
    pipeline.clock.now = at = T0 + timedelta(hours=25)
    expired = await pipeline.process_predictions([entry(5, "q5", "a", at=at), entry(6, "q6", "b", at=at)])
    assert (expired.alerts, expired.suppressed) == (2, 0)
    with Session(engine) as session:
        assert session.get(AlertRecord, alert_id_for("q3", "churn-high")).suppressed_by == alert_id_for(
            "q1", "churn-high")
    assert sorted(a["prediction_id"] for a in inbox(r, pipeline, "am")) == ["q1", "q2", "q4", "q5", "q6"]


async def test_a_duplicate_prediction_id_in_one_batch_is_rejected_once(pipeline, engine, r):
    result = await pipeline.process_predictions([entry(1, "d1", "a"), entry(2, "d1", "b")])
    assert result.accepted == 1 and result.rejected == {"duplicate": 1}
    assert [f["reason"] for _, f in r.xrange(pipeline.keys.predictions_dlq)] == ["duplicate"]
    assert count(engine, PredictionRecord) == 1


async def test_batch_log_lines_count_rejections_as_a_number_even_when_there_are_none(pipeline):
    with capture_logs() as logs:
        await pipeline.process_predictions([entry(1, "l1", "a")])
        await pipeline.process_predictions([entry(2, "l2", "b"), entry(3, "l2", "c"), entry(4, "l3", "d", score=7)])
        await pipeline.process_outcomes([("5-0", {"alert_id": "no-such-alert", "type": "acknowledged", "actor": "am"})])
    clean, mixed = [e for e in logs if e["event"] == "batch routed"]
    assert clean["rejected"] == 0 and "rejected_reasons" not in clean  # was None
    assert mixed["rejected"] == 2 and mixed["rejected_reasons"] == {"duplicate": 1, "score_out_of_range": 1}
    (outcomes,) = [e for e in logs if e["event"] == "outcomes recorded"]
    assert outcomes["rejected"] == 1 and outcomes["rejected_reasons"] == {"unknown_alert": 1}


async def test_marking_a_batch_delivered_skips_moved_and_already_marked_alerts(pipeline, engine):
    await pipeline.process_predictions([entry(1, "m1", "a", score=0.1), entry(2, "m2", "b", score=0.1),
                                        entry(3, "m3", "c", score=0.1)])
    ids = {pid: alert_id_for(pid, "rest") for pid in ("m1", "m2", "m3")}
    with Session(engine) as session:
        # m1 already marked; m2 written for an owner it has since been moved away from.
        session.execute(AlertRecord.__table__.update().where(AlertRecord.alert_id == ids["m1"])
                        .values(delivered_at=T0))
        session.commit()
        now = T0 + timedelta(seconds=5)
        marked = tracker.mark_delivered(session, {ids["m1"]: "desk", ids["m2"]: "am", ids["m3"]: "desk"},
                                        channel="inbox", now=now)
        session.commit()
        assert marked == [ids["m3"]]
        assert tracker.mark_delivered(session, {ids["m3"]: "desk"}, channel="inbox", now=now) == []
        delivered = session.scalars(select(AuditEvent).where(AuditEvent.type == "delivered")).all()
        assert [(e.alert_id, e.prediction_id, e.detail) for e in delivered] == [
            (ids["m3"], "m3", {"channel": "inbox", "owner": "desk"})]
        assert session.get(AlertRecord, ids["m2"]).delivered_at is None


async def test_a_batch_leaves_nothing_for_the_garbage_collector(pipeline):
    """Every object a batch makes is freed as soon as nothing refers to it: none is left in a
    reference cycle, which only the garbage collector frees. Statements built per batch left ~300
    (SQLAlchemy's), and with `serve`'s young-generation threshold the collector then paused the
    router 30-60 ms every ~150 batches (issue 8's latency)."""

    def batch(first: int) -> list[tuple[str, dict]]:
        # Cooldown windows read, claimed and suppressing; alerts delivered and marked; a record; a lookup.
        return [entry(first + n, f"gc{first + n}", f"gc-{first + n % 4}",
                      model="upsell" if n == 7 else "churn", score=0.1 if n == 5 else 0.9) for n in range(12)]

    await pipeline.process_predictions(batch(0))  # the first fills the caches (compiled statements...)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # the collector keeps what it would free, to be looked at
    try:
        result = await pipeline.process_predictions(batch(100))
        gc.collect()
        garbage = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert (result.accepted, result.alerts, result.suppressed, result.recorded) == (12, 5, 6, 1)
    assert not garbage, garbage.most_common(10)
