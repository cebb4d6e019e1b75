"""The read/ack loop on real Redis: a poison entry is isolated and dead-lettered after
max_attempts while the rest of its batch goes through; an outage is retried (never
dead-lettered), logged once, and leaves the batch pending if the service stops meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import timedelta

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from decision_router import metrics
from decision_router.keys import Keys
from decision_router.pipeline import Pipeline
from decision_router.service import running_service
from decision_router.settings import Settings
from decision_router.tables import PredictionRecord, RejectionRecord
from tests.integration.conftest import wait_until
from tests.integration.test_router_loop import count, prediction

pytestmark = pytest.mark.redis


def poisoned_by(entity_id: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Any batch holding `entity_id` fails, as a payload the store refuses would. Returns the
    sizes of the batches that failed, to see the poison isolated."""
    real = Pipeline.process_predictions
    failed: list[int] = []

    async def process(self, entries):
        if any(entity_id in json.dumps(fields) for _, fields in entries):
            failed.append(len(entries))
            raise ValueError(f"the store refused {entity_id}")
        return await real(self, entries)

    monkeypatch.setattr(Pipeline, "process_predictions", process)
    return failed


async def test_poison_entry_goes_to_the_dlq_after_max_attempts_and_the_rest_flows(
    settings, ruleset, engine, r, monkeypatch
) -> None:
    settings = settings.model_copy(update={"max_attempts": 3})
    keys = Keys(settings.stream_prefix)
    failed = poisoned_by("acct-poison", monkeypatch)
    before = metrics.REJECTED.labels("predictions", "processing_failed")._value.get()
    for n in range(5):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"good-{n}", entity_id=f"acct-{n}"))})
    poison_id = r.xadd(keys.predictions, {"data": json.dumps(prediction("bad", entity_id="acct-poison"))})
    for n in range(5, 11):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"good-{n}", entity_id=f"acct-{n}"))})

    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: r.xlen(keys.predictions_dlq) == 1, what="the poison in the DLQ")
        await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="all acked")
    (_, dead), = r.xrange(keys.predictions_dlq)
    assert dead["reason"] == "processing_failed"
    assert "ValueError" in dead["detail"] and "the store refused acct-poison" in dead["detail"]
    assert dead["source_id"] == poison_id and dead["source_stream"] == keys.predictions
    assert dead["model"] == "churn"
    assert json.loads(json.loads(dead["payload"])["data"])["prediction_id"] == "bad"
    # The eleven good entries, read in the same batch as the poison, went through.
    assert count(engine, PredictionRecord) == 11
    assert r.xlen(keys.inbox("alice-moreau")) == 11
    # Halved down to the poison alone, then tried on its own max_attempts times in all.
    assert failed[0] == 12 and failed.count(1) == 3
    assert count(engine, RejectionRecord, RejectionRecord.reason == "processing_failed") == 1
    assert metrics.REJECTED.labels("predictions", "processing_failed")._value.get() == before + 1


def unreachable_store(calls: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The store refuses connections for the first `calls` batches."""
    real = Pipeline.process_predictions
    failures: list[int] = []

    async def process(self, entries):
        if len(failures) < calls:
            failures.append(len(entries))
            raise OperationalError("insert", {}, ConnectionRefusedError("connection refused"))
        return await real(self, entries)

    monkeypatch.setattr(Pipeline, "process_predictions", process)
    return failures


async def test_store_outage_is_retried_never_dead_lettered_and_logged_once(
    settings, ruleset, engine, r, monkeypatch
) -> None:
    settings = settings.model_copy(update={"max_attempts": 2, "retry_backoff_max": timedelta(seconds=0.2)})
    keys = Keys(settings.stream_prefix)
    failures = unreachable_store(6, monkeypatch)  # three times max_attempts
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-out"))})
    with capture_logs() as logs:
        async with running_service(settings, ruleset, engine) as service:
            await wait_until(lambda: len(failures) >= 3, what="a few failed attempts")
            # Unacknowledged while the store is away.
            assert r.xpending(keys.predictions, service.group)["pending"] == 1
            await wait_until(lambda: count(engine, PredictionRecord) == 1, what="the entry processed")
            await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="acked")
    assert len(failures) == 6
    assert r.xlen(keys.predictions_dlq) == 0
    events = [e["event"] for e in logs]
    assert events.count("store unavailable; retrying in 0.2s") == 1
    assert events.count("store reachable again") == 1


async def test_stopping_during_an_outage_leaves_the_batch_pending(settings, ruleset, engine, r, monkeypatch) -> None:
    keys = Keys(settings.stream_prefix)
    failures = unreachable_store(10**6, monkeypatch)
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-stop"))})
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: len(failures) >= 1, what="the outage")
    # stop() returned: the entry is still pending on this consumer, to be retried later.
    assert r.xpending(keys.predictions, service.group)["pending"] == 1
    assert r.xlen(keys.predictions_dlq) == 0
    assert count(engine, PredictionRecord) == 0


async def test_an_idle_service_stops_without_waiting_out_its_blocking_read(settings, ruleset, engine, r) -> None:
    """stop() cuts short the XREADGROUP BLOCK an idle worker waits in (read_block_ms, here 4 s):
    it holds no batch. Nothing is left pending, and the next start routes what came after."""
    settings = settings.model_copy(update={"read_block_ms": 4_000})
    keys = Keys(settings.stream_prefix)
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-before"))})
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: count(engine, PredictionRecord) == 1, what="the first entry routed")
        await asyncio.sleep(0.5)  # the read loop waits for more, well into its block
        asked = time.monotonic()
    took = time.monotonic() - asked
    assert took < 1.0, f"stop took {took:.2f}s"
    assert r.xpending(keys.predictions, service.group)["pending"] == 0
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-after"))})
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: count(engine, PredictionRecord) == 2, what="the entry published after the stop")
        await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="acked")


async def test_entry_whose_worker_died_each_time_is_dead_lettered_on_reclaim(settings, ruleset, engine, r) -> None:
    """No error to count when the process dies (OOM killer, segfault): the delivery count Redis keeps, and the
    marker a worker sets while it handles a suspect on its own, are what stop the crash loop."""
    keys = Keys(settings.stream_prefix)
    r.xgroup_create(keys.predictions, settings.consumer_group, id="0", mkstream=True)
    crasher = r.xadd(keys.predictions, {"data": json.dumps(prediction("p-crash", entity_id="acct-crash"))})
    r.xadd(keys.predictions, {"data": json.dumps(prediction("p-fine", entity_id="acct-fine"))})
    r.xreadgroup(settings.consumer_group, "dead-1", {keys.predictions: ">"}, count=2)
    # Taken over and lost again by 2 x max_attempts workers in turn (each XCLAIM is a delivery).
    for n in range(2 * settings.max_attempts):
        r.xclaim(keys.predictions, settings.consumer_group, f"dead-{n + 2}", 0, [crasher])
    assert r.xpending_range(keys.predictions, settings.consumer_group, crasher, crasher, 1)[0]["times_delivered"] == 11
    r.set(keys.handled_alone(keys.predictions, crasher), "dead-11")  # the last worker died handling it alone
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: r.xlen(keys.predictions_dlq) == 1, what="the crasher in the DLQ")
        await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="all acked")
    (_, dead), = r.xrange(keys.predictions_dlq)
    assert dead["reason"] == "processing_failed" and dead["source_id"] == crasher
    assert "delivered 12 times and never acknowledged" in dead["detail"] and "on its own" in dead["detail"]
    # The other entry, delivered twice (read, then reclaimed), was routed.
    assert count(engine, PredictionRecord) == 1
    assert count(engine, PredictionRecord, PredictionRecord.prediction_id == "p-fine") == 1
    assert r.xlen(keys.inbox("alice-moreau")) == 1


async def test_the_longest_read_block_allowed_ends_as_a_reply_not_a_timeout(settings) -> None:
    """read_block_ms is capped under redis-py's 5 s socket timeout: at 6 s, each idle read failed as
    "Timeout reading from Redis" and the worker logged an outage. A client made as the service makes it."""
    longest = next(m.le for m in Settings.model_fields["read_block_ms"].metadata if hasattr(m, "le"))
    assert longest < 5_000
    client = Redis.from_url(settings.effective_redis_url)
    stream = Keys(settings.stream_prefix).predictions
    try:
        await client.xgroup_create(stream, "g", id="$", mkstream=True)
        started = time.monotonic()
        assert await client.xreadgroup("g", "c", {stream: ">"}, block=longest) == []
        assert time.monotonic() - started >= longest / 1000 - 0.1
    finally:
        await client.aclose()
    with pytest.raises(ValidationError, match="less than or equal to 4000"):
        Settings(read_block_ms=longest + 1)


async def test_a_slow_batch_on_a_live_worker_is_not_taken_for_a_crash(settings, ruleset, engine, r, monkeypatch) -> None:
    """MAX_ATTEMPTS=1 (a crash limit of 2 deliveries), a short CLAIM_IDLE, three workers, a batch that takes
    5 x CLAIM_IDLE. Each reclaim of it, by an idle worker or by its own worker's reclaim, counted as a
    delivery: taken over by a second worker, valid entries were dead-lettered as crashers (or, claimed only
    by its own worker, counted as many deliveries as there were reclaims, dead-lettered at the next restart).
    Kept alive by the worker that holds it, it is never reclaimed: delivered once."""
    # CLAIM_IDLE 0.5 s: the keep-alive (every 0.125 s, of entries idle 0.167 s or more) has a third of a second to
    # spare before a reclaim could take an entry; at 0.2 s a loaded machine's scheduling delays used up its 0.13 s.
    settings = settings.model_copy(update={"max_attempts": 1, "claim_idle": timedelta(seconds=0.5), "batch_size": 5})
    keys = Keys(settings.stream_prefix)
    real = Pipeline.process_predictions

    async def slow(self, entries):
        await asyncio.sleep(2.5)  # a slow store, a slow lookup
        return await real(self, entries)

    monkeypatch.setattr(Pipeline, "process_predictions", slow)
    for n in range(5):  # one batch: whoever reads it holds it, the two others are idle
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"slow-{n}", entity_id=f"acct-{n}"))})
    deliveries: set[int] = set()

    def all_acked() -> bool:
        pending = r.xpending_range(keys.predictions, settings.consumer_group, "-", "+", 10)
        deliveries.update(p["times_delivered"] for p in pending)
        return not pending and count(engine, PredictionRecord) + r.xlen(keys.predictions_dlq) >= 5

    async with contextlib.AsyncExitStack() as workers:
        for n in range(3):
            named = settings.model_copy(update={"consumer_name": f"worker-{n + 1}"})
            await workers.enter_async_context(running_service(named, ruleset, engine))
        await wait_until(all_acked, what="every entry stored or dead-lettered, and acknowledged")
    assert deliveries == {1}
    assert r.xlen(keys.predictions_dlq) == 0
    assert count(engine, PredictionRecord) == 5
    assert count(engine, RejectionRecord) == 0


async def test_the_batch_a_stopping_worker_finishes_is_not_taken_over_meanwhile(
    settings, ruleset, engine, r, monkeypatch
) -> None:
    """Stopping, a worker finishes the batch in hand (up to SHUTDOWN_TIMEOUT). Its keep-alive stopped when the
    stop began, so another worker's reclaim took the batch over after CLAIM_IDLE, counted a delivery and
    handled it too. Kept alive until the read loop ends, it is delivered once and handled once."""
    settings = settings.model_copy(update={
        "max_attempts": 1, "claim_idle": timedelta(seconds=0.5), "batch_size": 5,  # see the test above
        "shutdown_timeout": timedelta(seconds=10),
    })
    keys = Keys(settings.stream_prefix)
    real = Pipeline.process_predictions
    started = asyncio.Event()
    handled: list[str] = []

    async def slow(self, entries):
        handled.extend(entry_id for entry_id, _ in entries)
        started.set()
        await asyncio.sleep(2.5)  # a slow store: 5 x CLAIM_IDLE
        return await real(self, entries)

    monkeypatch.setattr(Pipeline, "process_predictions", slow)
    for n in range(5):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"stop-{n}", entity_id=f"acct-{n}"))})
    deliveries: set[int] = set()

    def all_acked() -> bool:
        pending = r.xpending_range(keys.predictions, settings.consumer_group, "-", "+", 10)
        deliveries.update(p["times_delivered"] for p in pending)
        return not pending and count(engine, PredictionRecord) + r.xlen(keys.predictions_dlq) >= 5

    first = settings.model_copy(update={"consumer_name": "worker-1"})
    second = settings.model_copy(update={"consumer_name": "worker-2"})
    async with running_service(first, ruleset, engine) as stopping:
        await asyncio.wait_for(started.wait(), 10)
        async with running_service(second, ruleset, engine):
            stop = asyncio.create_task(stopping.stop())  # returns once its batch is finished and acknowledged
            while not stop.done():
                all_acked()  # the deliveries counted while the batch is finished
                await asyncio.sleep(0.02)
            await stop
            await wait_until(all_acked, what="every entry stored or dead-lettered, and acknowledged")
    assert deliveries == {1}
    assert len(handled) == 5  # once each: not handled again by worker-2
    assert r.xlen(keys.predictions_dlq) == 0
    assert count(engine, PredictionRecord) == 5
