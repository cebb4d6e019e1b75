"""An input handled again after its effects were committed (a crash before the XACK, an outage or
a failed write after the commit, another worker's reclaim) must finish what the first pass left
undone, and change nothing else: no alert left out of an inbox, no rejection of an input the store
accepted. Real Redis, both stores. The failure between the commit and the inbox write is made
deterministic by a key of the wrong type where the inbox stream goes (XADD answers WRONGTYPE)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from decision_router import tracker
from decision_router.contracts import Prediction, Rejection
from decision_router.pipeline import Pipeline
from decision_router.service import RouterService
from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord, RejectionRecord
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_outcomes import alert_row, route_three
from tests.integration.test_router_loop import count, prediction

pytestmark = pytest.mark.redis


@pytest.fixture
def settings(settings):
    # Retries enough for the test to repair the inbox key between two of them on a slow machine.
    return settings.model_copy(update={"max_attempts": 20})


async def test_a_reassignment_retried_after_its_inbox_write_failed_reaches_the_new_owner(service, r, engine) -> None:
    keys = service.keys
    a1, _, _ = await route_three(service, r, engine)
    r.set(keys.inbox("benoit-garnier"), "not a stream")  # the inbox write after the commit fails
    with capture_logs() as logs:
        r.xadd(keys.outcomes,
               {"alert_id": a1, "type": "reassigned", "actor": "lead-strategic", "owner": "benoit-garnier"})
        await wait_until(lambda: any(e["event"] == "entry failed; retrying" for e in logs), what="the failed write")
    # Committed: the retry finds the event applied already.
    assert count(engine, AuditEvent, AuditEvent.type == "reassigned") == 1
    assert alert_row(engine, a1).delivered_at is None
    r.delete(keys.inbox("benoit-garnier"))

    await wait_until(lambda: r.exists(keys.inbox("benoit-garnier")) and r.xlen(keys.inbox("benoit-garnier")) >= 1,
                     timeout=15, what="the reassigned alert in the new owner's inbox")
    await wait_until(lambda: not r.xpending(keys.outcomes, service.group)["pending"], what="the outcome acknowledged")
    ((_, fields),) = r.xrange(keys.inbox("benoit-garnier"))
    assert json.loads(fields["data"])["alert_id"] == a1
    assert alert_row(engine, a1).delivered_at is not None
    assert count(engine, AlertRecord, AlertRecord.delivered_at.is_(None)) == 0
    assert r.xlen(keys.outcomes_dlq) == 0
    assert count(engine, AuditEvent, AuditEvent.type == "reassigned") == 1


def aged_entry(entry_id: str, pid: str, *, age: timedelta, now: datetime) -> tuple[str, dict]:
    document = {**prediction(pid), "predicted_at": (now - age).isoformat()}
    return entry_id, {"data": json.dumps(document)}


@pytest.fixture
async def pipeline(settings, ruleset, engine):
    redis = Redis.from_url(settings.redis_url)
    yield Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=ManualClock(datetime.now(UTC)))
    await redis.aclose()


async def test_a_prediction_redelivered_after_it_aged_past_the_limit_is_finished_not_rejected_as_stale(
    pipeline, engine, r
) -> None:
    # A daily batch scored near the end of max_prediction_age (1 day), stored, then an outage or a crash
    # before the ack: by the time the entry is read again it is too old for the gate.
    keys, clock = pipeline.keys, pipeline.clock
    entries = [aged_entry("1-0", "late-1", age=timedelta(hours=23, minutes=50), now=clock.now),
               aged_entry("2-0", "late-2", age=timedelta(hours=23, minutes=50), now=clock.now)]
    r.set(keys.inbox("alice-moreau"), "not a stream")  # the inbox write after the commit fails
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipeline.process_predictions(entries)
    assert count(engine, PredictionRecord) == 2
    assert count(engine, AlertRecord, AlertRecord.delivered_at.is_not(None)) == 0
    r.delete(keys.inbox("alice-moreau"))

    clock.now += timedelta(minutes=20)  # now 24h10m old
    result = await pipeline.process_predictions(entries)

    assert (result.redelivered, result.rejected) == (2, {})
    assert r.xlen(keys.predictions_dlq) == 0
    assert count(engine, RejectionRecord) == 0
    delivered = [json.loads(fields["data"])["prediction_id"] for _, fields in r.xrange(keys.inbox("alice-moreau"))]
    assert sorted(delivered) == ["late-1", "late-2"]
    assert count(engine, AlertRecord, AlertRecord.action == "alert", AlertRecord.delivered_at.is_(None)) == 0

    # A stale entry that was never stored is still rejected, once.
    result = await pipeline.process_predictions([aged_entry("3-0", "late-3", age=timedelta(days=2), now=clock.now)])
    assert result.rejected == {"stale": 1}
    assert r.xlen(keys.predictions_dlq) == 1 and count(engine, RejectionRecord) == 1


def entry_id_at(moment: datetime, sequence: int = 0) -> str:
    """A stream entry id as Redis makes it: the milliseconds it was added at."""
    return f"{int(moment.timestamp() * 1000)}-{sequence}"


async def test_a_prediction_rejected_as_from_the_future_and_read_again_once_valid_stays_rejected(
    pipeline, engine, r
) -> None:
    # Sent by a producer whose clock runs 10 minutes ahead (the limit is 5). The router's ack never
    # reached Redis (a crash, an outage); by the time the entry is read again, it is no longer ahead.
    keys, clock = pipeline.keys, pipeline.clock
    ahead = clock.now + timedelta(minutes=10)
    entry = (entry_id_at(clock.now), {"data": json.dumps({**prediction("ahead-1"), "predicted_at": ahead.isoformat()})})
    in_step = (entry_id_at(clock.now, 1), {"data": json.dumps(prediction("in-step-1"))})
    first = await pipeline.process_predictions([entry, in_step])
    assert first.rejected == {"from_future": 1} and first.accepted == 1

    clock.now += timedelta(minutes=6)
    again = await pipeline.process_predictions([entry, in_step])

    assert again.rejected == {"from_future": 1}  # not routed this time
    assert (again.accepted, again.redelivered) == (0, 1)
    assert count(engine, PredictionRecord) == 1  # in-step-1 only
    assert count(engine, RejectionRecord) == 1 and r.xlen(keys.predictions_dlq) == 1  # once each
    ((_, dead),) = r.xrange(keys.predictions_dlq)
    assert dead["reason"] == "from_future"
    assert json.loads(json.loads(dead["payload"])["data"])["prediction_id"] == "ahead-1"

    # A fresh entry of that same prediction, valid now, is routed as usual.
    later = await pipeline.process_predictions([(entry_id_at(clock.now), entry[1])])
    assert (later.accepted, later.rejected) == (1, {})


async def test_an_outcome_rejected_before_its_alert_existed_and_read_again_after_stays_rejected(
    pipeline, engine, r
) -> None:
    # The CRM's event overtook the prediction it is about; the router's ack never reached Redis, and the
    # entry is read again after the alert was made.
    keys = pipeline.keys
    event = ("5-0", {"prediction_id": "early-1", "type": "acknowledged", "actor": "alice-moreau"})
    first = await pipeline.process_outcomes([event])
    assert first.rejected == {"unknown_alert": 1}

    routed = await pipeline.process_predictions([(entry_id_at(pipeline.clock.now), {"data": json.dumps(
        {**prediction("early-1"), "predicted_at": pipeline.clock.now.isoformat()})})])
    assert routed.alerts == 1

    again = await pipeline.process_outcomes([event])

    assert (again.accepted, again.rejected) == (0, {"unknown_alert": 1})
    assert count(engine, AuditEvent, AuditEvent.type == "acknowledged") == 0
    assert count(engine, AlertRecord, AlertRecord.acknowledged_at.is_not(None)) == 0
    assert count(engine, RejectionRecord) == 1 and r.xlen(keys.outcomes_dlq) == 1


def test_only_predictions_stamped_after_their_entry_was_added_are_looked_up_among_earlier_rejections() -> None:
    from decision_router.pipeline import stamped_after_added

    added = datetime(2026, 11, 25, 15, 32, 31, 200000, tzinfo=UTC)
    def entry(entry_id: str, predicted_at: datetime) -> tuple:
        return entry_id, {}, Prediction.model_validate({**prediction("p"), "predicted_at": predicted_at.isoformat()})

    checked = [
        entry(entry_id_at(added), added - timedelta(seconds=1)),  # stamped before it was sent: as usual
        entry(entry_id_at(added, 1), added + timedelta(microseconds=900)),  # within the id's 1 ms step
        entry(entry_id_at(added, 2), added + timedelta(minutes=6)),  # from a clock ahead
        entry("manual-7", added),  # an id that is no time
        (entry_id_at(added, 3), {}, Rejection(reason="schema", detail="", source_stream="s", payload="")),
    ]
    assert stamped_after_added(checked) == [entry_id_at(added, 2), "manual-7"]


async def test_a_rejection_read_again_is_counted_once_in_the_metrics(pipeline, engine, r) -> None:
    from decision_router import metrics

    def rejected(reason: str) -> float:
        return metrics.REJECTED.labels("predictions", reason)._value.get()

    before = rejected("score_out_of_range")
    entry = (entry_id_at(pipeline.clock.now), {"data": json.dumps({**prediction("bad-score"), "score": 7})})
    first = await pipeline.process_predictions([entry])
    again = await pipeline.process_predictions([entry])  # a crash before the ack: read again

    assert first.rejected == again.rejected == {"score_out_of_range": 1}  # the batch's own log says so each time
    assert rejected("score_out_of_range") - before == 1  # as the store counts it, and the DLQ holds it
    assert count(engine, RejectionRecord) == 1 and r.xlen(pipeline.keys.predictions_dlq) == 1


def crash_looped(r, stream: str, group: str, entry_ids: list[str], *, deliveries: int) -> None:
    """As if each of `entry_ids` had been delivered `deliveries` times, its worker gone each time before the
    ack, and pending on a dead consumer for a minute: the next reclaim takes it (RETRYCOUNT, IDLE)."""
    r.xclaim(stream, group, "dead-worker", 0, entry_ids, idle=60_000, retrycount=deliveries)


async def reclaimed(pipeline: Pipeline) -> int:
    """One reclaim pass of a live worker, as RouterService runs every CLAIM_IDLE / 2; how many it took."""
    reader = RouterService(pipeline).reader
    await reader.ensure_groups()
    return await reader.reclaim_once()


def stored_then_stopped(r, stream: str, group: str, *entries: tuple[str, dict]) -> list[str]:
    """Entries read by a worker that is gone now: pending on it, unacknowledged."""
    r.xgroup_create(stream, group, id="0", mkstream=True)
    ids = [r.xadd(stream, fields) for fields in entries]
    r.xreadgroup(group, "dead-worker", {stream: ">"}, count=len(ids))
    return ids


async def test_a_prediction_stored_before_its_worker_stopped_each_time_is_finished_not_dead_lettered(
    pipeline, engine, r
) -> None:
    # Stored, then the worker gone before the inbox write and the ack (here: the write fails), again and
    # again: over the crash limit. Its alerts go out, it is acknowledged, and it is no failure. An entry
    # read as many times, never stored, whose worker died while handling it on its own, is dead-lettered,
    # unprocessed.
    from decision_router import metrics

    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    stored, crasher = stored_then_stopped(
        r, keys.predictions, group,
        {"data": json.dumps(prediction("p-stored"))}, {"data": json.dumps(prediction("p-crash"))},
    )
    r.set(keys.inbox("alice-moreau"), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipeline.process_predictions(r.xrange(keys.predictions, stored, stored))
    r.delete(keys.inbox("alice-moreau"))
    crash_looped(r, keys.predictions, group, [stored, crasher], deliveries=2 * settings.max_attempts + 1)
    r.set(keys.handled_alone(keys.predictions, crasher), "dead-worker")
    failed_before = metrics.REJECTED.labels("predictions", "processing_failed")._value.get()

    with capture_logs() as logs:
        assert await reclaimed(pipeline) == 2

    assert r.xpending(keys.predictions, group)["pending"] == 0
    delivered = [json.loads(fields["data"])["prediction_id"] for _, fields in r.xrange(keys.inbox("alice-moreau"))]
    assert delivered == ["p-stored"]  # once
    assert count(engine, AlertRecord, AlertRecord.delivered_at.is_(None)) == 0
    ((_, dead),) = r.xrange(keys.predictions_dlq)
    assert dead["source_id"] == crasher and dead["reason"] == "processing_failed"
    assert dead["detail"].startswith(f"delivered {2 * settings.max_attempts + 2} times and never acknowledged: its"
                                     " worker stopped each time, the last time while handling this entry on its own")
    assert not r.exists(keys.handled_alone(keys.predictions, crasher))
    assert count(engine, RejectionRecord) == 1 and count(engine, RejectionRecord, RejectionRecord.source_id == stored) == 0
    assert metrics.REJECTED.labels("predictions", "processing_failed")._value.get() == failed_before + 1
    assert count(engine, PredictionRecord) == 1  # the crasher not routed
    (finished,) = [e for e in logs if e["event"].startswith("entry redelivered after its worker stopped")]
    assert finished["entry_id"] == stored


async def test_outcomes_stored_before_their_worker_stopped_each_time_are_finished_not_dead_lettered(
    pipeline, engine, r
) -> None:
    # A reassignment applied, its worker gone before the new owner's inbox write; an event rejected, its worker
    # gone before the DLQ write. Over the crash limit, each is finished as its first pass would have.
    from decision_router.tracker import alert_id_for

    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    routed = await pipeline.process_predictions([(entry_id_at(pipeline.clock.now), {"data": json.dumps(
        {**prediction("o1"), "predicted_at": pipeline.clock.now.isoformat()})})])
    assert routed.alerts == 1
    a1 = alert_id_for("o1", "enterprise-churn-risk")
    reassigned, unknown = stored_then_stopped(
        r, keys.outcomes, group,
        {"alert_id": a1, "type": "reassigned", "actor": "lead-strategic", "owner": "benoit-garnier"},
        {"alert_id": "al-nowhere", "type": "acknowledged", "actor": "alice-moreau"},
    )
    r.set(keys.inbox("benoit-garnier"), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipeline.process_outcomes(r.xrange(keys.outcomes, reassigned, reassigned))
    r.delete(keys.inbox("benoit-garnier"))
    r.set(keys.outcomes_dlq, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipeline.process_outcomes(r.xrange(keys.outcomes, unknown, unknown))
    r.delete(keys.outcomes_dlq)
    crash_looped(r, keys.outcomes, group, [reassigned, unknown], deliveries=2 * settings.max_attempts + 1)

    assert await reclaimed(pipeline) == 2

    assert r.xpending(keys.outcomes, group)["pending"] == 0
    ((_, fields),) = r.xrange(keys.inbox("benoit-garnier"))
    assert json.loads(fields["data"])["alert_id"] == a1
    ((_, dead),) = r.xrange(keys.outcomes_dlq)
    assert (dead["source_id"], dead["reason"]) == (unknown, "unknown_alert")  # its own reason, not processing_failed
    assert count(engine, RejectionRecord) == 1
    assert count(engine, AuditEvent, AuditEvent.type == "reassigned") == 1


async def test_the_store_down_while_telling_stored_crashers_is_waited_out_not_dead_lettered(
    pipeline, engine, r, monkeypatch
) -> None:
    from sqlalchemy.exc import OperationalError

    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    (stored,) = stored_then_stopped(r, keys.predictions, group, {"data": json.dumps(prediction("p-stored"))})
    await pipeline.process_predictions(r.xrange(keys.predictions))
    crash_looped(r, keys.predictions, group, [stored], deliveries=2 * settings.max_attempts + 1)
    real, refused = tracker.known_predictions, []

    def store_down_twice(session, prediction_ids):
        if len(refused) < 2:
            refused.append(list(prediction_ids))
            raise OperationalError("select", {}, ConnectionRefusedError("connection refused"))
        return real(session, prediction_ids)

    monkeypatch.setattr(tracker, "known_predictions", store_down_twice)

    assert await reclaimed(pipeline) == 1

    assert refused == [["p-stored"], ["p-stored"]]
    assert r.xpending(keys.predictions, group)["pending"] == 0
    assert r.xlen(keys.predictions_dlq) == 0 and count(engine, RejectionRecord) == 0


class WorkerDied(BaseException):
    """The worker gone in the middle of a step (a crash, the OOM killer, a hang its supervisor killed): no
    handler of the router's runs, as none would in a process that is gone."""


def deliveries_of(r, stream: str, group: str, entry_id: str) -> int:
    return r.xpending_range(stream, group, entry_id, entry_id, 1)[0]["times_delivered"]


async def finishing_stopped_its_worker(pipeline: Pipeline, r, entry_id: str, *, times: int) -> None:
    """`times` reclaims of a prediction entry, each ending with its worker gone while finishing it."""
    stream, group = pipeline.keys.predictions, pipeline.settings.consumer_group
    for _ in range(times):
        with pytest.raises(WorkerDied):
            await reclaimed(pipeline)
        crash_looped(r, stream, group, [entry_id], deliveries=deliveries_of(r, stream, group, entry_id))


async def test_the_entry_that_kills_its_worker_is_found_among_its_batch_and_only_it_is_dead_lettered(
    pipeline, engine, r, monkeypatch
) -> None:
    # A batch of three whose worker died on each of its 2 x max_attempts deliveries: any of them may be the
    # cause, so each is handled on its own. The first goes through; the worker dies on the second, which leaves
    # its marker; the next reader dead-letters that one alone and routes the third. Before, all three were
    # dead-lettered together as crashers.
    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    ids = stored_then_stopped(r, keys.predictions, group, *(
        {"data": json.dumps(prediction(pid, entity_id=f"acct-{pid}"))} for pid in ("p-fine-1", "p-kills", "p-fine-2")))
    crash_looped(r, keys.predictions, group, ids, deliveries=2 * settings.max_attempts)
    real = Pipeline.process_predictions
    handled: list[list[str]] = []

    async def dies_on_one(self, entries):
        names = [json.loads(fields["data"])["prediction_id"] for _, fields in entries]
        handled.append(names)
        if "p-kills" in names:
            raise WorkerDied
        return await real(self, entries)

    monkeypatch.setattr(Pipeline, "process_predictions", dies_on_one)
    with pytest.raises(WorkerDied):
        await reclaimed(pipeline)
    assert handled == [["p-fine-1"], ["p-kills"]]
    assert r.exists(keys.handled_alone(keys.predictions, ids[1]))
    crash_looped(r, keys.predictions, group, ids[1:], deliveries=2 * settings.max_attempts + 1)

    assert await reclaimed(pipeline) == 2

    assert handled == [["p-fine-1"], ["p-kills"], ["p-fine-2"]]  # the culprit not handled again
    assert r.xpending(keys.predictions, group)["pending"] == 0
    ((_, dead),) = r.xrange(keys.predictions_dlq)
    assert (dead["source_id"], dead["reason"]) == (ids[1], "processing_failed")
    assert "the last time while handling this entry on its own" in dead["detail"]
    assert not any(r.exists(keys.handled_alone(keys.predictions, entry_id)) for entry_id in ids)
    routed = {p for (p,) in _column(engine, PredictionRecord.prediction_id)}
    assert routed == {"p-fine-1", "p-fine-2"}
    delivered = [json.loads(fields["data"])["prediction_id"] for _, fields in r.xrange(keys.inbox("alice-moreau"))]
    assert delivered == ["p-fine-1", "p-fine-2"]


async def test_a_suspect_whose_handling_is_cancelled_by_a_stop_leaves_no_marker(pipeline, engine, r, monkeypatch) -> None:
    # A stop that cancels the batch in hand (past SHUTDOWN_TIMEOUT) is no death: the marker, which would have the
    # entry dead-lettered when read again, goes; the entry stays pending, to be handled again.
    import asyncio

    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    (entry_id,) = stored_then_stopped(r, keys.predictions, group, {"data": json.dumps(prediction("p-slow"))})
    crash_looped(r, keys.predictions, group, [entry_id], deliveries=2 * settings.max_attempts)
    started = asyncio.Event()

    async def hangs(self, entries):
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Pipeline, "process_predictions", hangs)
    task = asyncio.create_task(reclaimed(pipeline))
    await asyncio.wait_for(started.wait(), 30)
    assert r.exists(keys.handled_alone(keys.predictions, entry_id))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not r.exists(keys.handled_alone(keys.predictions, entry_id))
    assert r.xpending(keys.predictions, group)["pending"] == 1 and r.xlen(keys.predictions_dlq) == 0


def _column(engine, column) -> list[tuple]:
    from sqlalchemy import select
    from sqlmodel import Session

    with Session(engine) as session:
        return list(session.execute(select(column)))


async def test_an_entry_whose_finishing_stops_its_worker_each_time_is_dead_lettered_and_its_alerts_drained_once(
    pipeline, engine, r, monkeypatch
) -> None:
    # Stored, its inbox write undone, then over the crash limit; finishing it (writing that alert) stops the
    # worker each time too. Finishing is tried as often as processing was (max_attempts), then the entry is
    # handled on its own, which stops its worker again: the marker it leaves names it, and it is dead-lettered,
    # or it would be redelivered forever. The periodic outbox drain delivers its alert, once.
    from decision_router import metrics
    from decision_router.outbox import GRACE, OutboxDrain

    keys, settings = pipeline.keys, pipeline.settings
    group, attempts = settings.consumer_group, settings.max_attempts
    (stored,) = stored_then_stopped(r, keys.predictions, group, {"data": json.dumps(prediction("p-stored"))})
    r.set(keys.inbox("alice-moreau"), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipeline.process_predictions(r.xrange(keys.predictions))
    r.delete(keys.inbox("alice-moreau"))
    crash_looped(r, keys.predictions, group, [stored], deliveries=2 * attempts)
    failed_before = metrics.REJECTED.labels("predictions", "processing_failed")._value.get()
    finishing = []

    async def stops_its_worker(*, prediction_ids):
        finishing.append(deliveries_of(r, keys.predictions, group, stored))
        raise WorkerDied

    monkeypatch.setattr(pipeline, "drain_outbox", stops_its_worker)
    await finishing_stopped_its_worker(pipeline, r, stored, times=attempts + 1)
    assert r.xlen(keys.predictions_dlq) == 0
    # Each delivery up to 3 x max_attempts finishing the batch of suspects, then one on its own.
    assert finishing == list(range(2 * attempts + 1, 3 * attempts + 2))
    assert r.exists(keys.handled_alone(keys.predictions, stored))  # left by the worker that died with it alone

    assert await reclaimed(pipeline) == 1

    assert len(finishing) == attempts + 1  # not tried again
    assert r.xpending(keys.predictions, group)["pending"] == 0
    ((_, dead),) = r.xrange(keys.predictions_dlq)
    assert (dead["source_id"], dead["reason"]) == (stored, "processing_failed")
    assert dead["detail"] == (
        f"delivered {3 * attempts + 2} times and never acknowledged: its worker stopped each time, the last time"
        " while handling this entry on its own; alerts the store holds from it reach their inboxes through the"
        " outbox drain")
    assert not r.exists(keys.handled_alone(keys.predictions, stored))
    assert metrics.REJECTED.labels("predictions", "processing_failed")._value.get() == failed_before + 1
    assert count(engine, RejectionRecord) == 1 and count(engine, PredictionRecord) == 1  # not routed again
    assert not r.exists(keys.inbox("alice-moreau"))

    monkeypatch.undo()
    pipeline.clock.now += GRACE + timedelta(seconds=1)
    drain = OutboxDrain(pipeline)
    assert await drain.drain_once() == 1
    assert await drain.drain_once() == 0
    delivered = [json.loads(fields["data"])["prediction_id"] for _, fields in r.xrange(keys.inbox("alice-moreau"))]
    assert delivered == ["p-stored"]  # once
    assert count(engine, AlertRecord, AlertRecord.delivered_at.is_(None)) == 0


async def test_an_entry_read_for_the_last_time_before_the_finishing_bound_is_still_finished(
    pipeline, engine, r
) -> None:
    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    (stored,) = stored_then_stopped(r, keys.predictions, group, {"data": json.dumps(prediction("p-stored"))})
    r.set(keys.inbox("alice-moreau"), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipeline.process_predictions(r.xrange(keys.predictions))
    r.delete(keys.inbox("alice-moreau"))
    crash_looped(r, keys.predictions, group, [stored], deliveries=3 * settings.max_attempts - 1)

    assert await reclaimed(pipeline) == 1  # its delivery 3 x max_attempts

    assert r.xpending(keys.predictions, group)["pending"] == 0
    assert r.xlen(keys.predictions_dlq) == 0 and count(engine, RejectionRecord) == 0
    delivered = [json.loads(fields["data"])["prediction_id"] for _, fields in r.xrange(keys.inbox("alice-moreau"))]
    assert delivered == ["p-stored"]


async def test_a_rejection_whose_finishing_stops_its_worker_each_time_keeps_its_reason_and_is_counted_once(
    pipeline, engine, r, monkeypatch
) -> None:
    # Rejected (its DLQ entry written, counted), its worker gone before the ack, again and again, also while
    # finishing it: past both bounds, the DLQ and the store keep its first reason, and processing_failed is
    # not counted on top of it.
    from decision_router import metrics

    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    (rejected,) = stored_then_stopped(
        r, keys.predictions, group, {"data": json.dumps({**prediction("bad-score"), "score": 7})})
    assert (await pipeline.process_predictions(r.xrange(keys.predictions))).rejected == {"score_out_of_range": 1}
    crash_looped(r, keys.predictions, group, [rejected], deliveries=2 * settings.max_attempts)

    async def stops_its_worker(entries):
        raise WorkerDied

    monkeypatch.setattr(pipeline, "finish_stored_predictions", stops_its_worker)
    await finishing_stopped_its_worker(pipeline, r, rejected, times=settings.max_attempts)

    def counted(reason: str) -> float:
        return metrics.REJECTED.labels("predictions", reason)._value.get()

    before = counted("score_out_of_range"), counted("processing_failed")

    assert await reclaimed(pipeline) == 1

    assert r.xpending(keys.predictions, group)["pending"] == 0
    ((_, dead),) = r.xrange(keys.predictions_dlq)
    assert (dead["source_id"], dead["reason"]) == (rejected, "score_out_of_range")
    assert count(engine, RejectionRecord) == 1
    assert count(engine, RejectionRecord, RejectionRecord.reason == "score_out_of_range") == 1
    assert (counted("score_out_of_range"), counted("processing_failed")) == before


async def test_a_suspect_stored_before_its_worker_died_while_handling_it_alone_is_finished_not_dead_lettered(
    pipeline, engine, r, monkeypatch
) -> None:
    # A suspect handled on its own under its marker: stored (routed, counted), then its worker gone before the ack.
    # The marker left behind names it, but the store holds its effects: it is finished, not dead-lettered as
    # processing_failed on top of being accepted (counted once, in the store and the metrics).
    from decision_router import metrics

    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    (entry_id,) = stored_then_stopped(r, keys.predictions, group, {"data": json.dumps(prediction("p-stored-alone"))})
    crash_looped(r, keys.predictions, group, [entry_id], deliveries=2 * settings.max_attempts)
    real = Pipeline.process_predictions

    async def stores_then_dies(self, entries):
        await real(self, entries)
        raise WorkerDied  # after the commit (and here the inbox write), before the ack

    monkeypatch.setattr(Pipeline, "process_predictions", stores_then_dies)
    with pytest.raises(WorkerDied):
        await reclaimed(pipeline)
    assert r.exists(keys.handled_alone(keys.predictions, entry_id))
    monkeypatch.undo()
    crash_looped(r, keys.predictions, group, [entry_id], deliveries=2 * settings.max_attempts + 1)

    def counted() -> tuple[float, float]:
        return (metrics.PREDICTIONS_ROUTED._value.get(),
                metrics.REJECTED.labels("predictions", "processing_failed")._value.get())

    before = counted()

    assert await reclaimed(pipeline) == 1

    assert counted() == before
    assert r.xpending(keys.predictions, group)["pending"] == 0
    assert r.xlen(keys.predictions_dlq) == 0 and count(engine, RejectionRecord) == 0
    assert count(engine, PredictionRecord) == 1
    assert not r.exists(keys.handled_alone(keys.predictions, entry_id))
    delivered = [json.loads(fields["data"])["prediction_id"] for _, fields in r.xrange(keys.inbox("alice-moreau"))]
    assert delivered == ["p-stored-alone"]  # once


async def test_a_suspect_stopped_during_a_redis_outage_leaves_no_marker_and_is_routed_when_read_again(
    pipeline, engine, r, monkeypatch
) -> None:
    # Handled on its own, the suspect meets a Redis outage and its worker is told to stop (SIGTERM): no death.
    # The marker cannot be removed while Redis is down; left behind, it would have this valid entry
    # dead-lettered when read again. The stopping worker removes it once Redis answers (within the shutdown).
    import asyncio

    from redis.exceptions import ConnectionError as RedisConnectionError

    keys, settings = pipeline.keys, pipeline.settings
    group = settings.consumer_group
    (entry_id,) = stored_then_stopped(r, keys.predictions, group, {"data": json.dumps(prediction("p-valid"))})
    crash_looped(r, keys.predictions, group, [entry_id], deliveries=2 * settings.max_attempts)
    in_outage = asyncio.Event()

    async def redis_down(self, entries):
        in_outage.set()
        raise RedisConnectionError("Connection refused")

    real_delete, refused = pipeline.redis.delete, []

    async def delete_while_down(*names):
        if len(refused) < 3:  # Redis still down for the stopping worker's first tries
            refused.append(names)
            raise RedisConnectionError("Connection refused")
        return await real_delete(*names)

    monkeypatch.setattr(Pipeline, "process_predictions", redis_down)
    reader = RouterService(pipeline).reader
    await reader.ensure_groups()
    monkeypatch.setattr(reader.redis, "delete", delete_while_down)
    task = asyncio.create_task(reader.reclaim_once())
    await asyncio.wait_for(in_outage.wait(), 30)
    assert r.exists(keys.handled_alone(keys.predictions, entry_id))
    reader.stop()
    await asyncio.wait_for(task, 30)

    assert len(refused) == 3
    assert not r.exists(keys.handled_alone(keys.predictions, entry_id))
    assert r.xpending(keys.predictions, group)["pending"] == 1 and r.xlen(keys.predictions_dlq) == 0
    monkeypatch.undo()
    crash_looped(r, keys.predictions, group, [entry_id], deliveries=2 * settings.max_attempts + 1)

    assert await reclaimed(pipeline) == 1

    assert r.xlen(keys.predictions_dlq) == 0 and count(engine, RejectionRecord) == 0
    assert count(engine, PredictionRecord) == 1 and r.xpending(keys.predictions, group)["pending"] == 0
