"""The outbox is drained while the router runs (outbox.py), not only at start: an alert whose inbox write
failed with an error that is no outage (a key of the wrong type where the inbox goes) reaches the inbox once
the key is fixed, exactly once, without a restart, also with two drains (workers) at once. Alerts younger
than the grace are left to the batch delivering them, and the drain reads only undelivered alerts, through
their partial index (tables.OUTBOX_PENDING), on both stores."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from structlog.testing import capture_logs

from benchmarks.bench_sla_sweep import sent_statements
from decision_router import tracker
from decision_router.keys import Keys
from decision_router.outbox import OutboxDrain
from decision_router.pipeline import Pipeline
from decision_router.service import running_service
from decision_router.store import create_schema, schema_is_current
from decision_router.tables import AlertRecord, AuditEvent
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_due_alerts import alert_row, insert_alerts
from tests.integration.test_faults_helpers import Router, wait_for
from tests.integration.test_retired_indexes import index_names
from tests.integration.test_router_loop import count, inbox, prediction

pytestmark = pytest.mark.redis

OWNER = "alice-moreau"  # the owner of test_router_loop.prediction's alert


@pytest.fixture
async def pipeline(settings, ruleset, engine) -> AsyncIterator[Pipeline]:
    redis = Redis.from_url(settings.redis_url)
    yield Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=ManualClock(datetime.now(UTC)))
    await redis.aclose()


def entry(n: int, pid: str, clock: ManualClock) -> tuple[str, dict]:
    return f"{n}-0", {"data": json.dumps({**prediction(pid), "predicted_at": clock.now.isoformat()})}


def undelivered(engine: Engine) -> int:
    return count(engine, AlertRecord, AlertRecord.action == "alert", AlertRecord.delivered_at.is_(None))


def delivered_events(engine: Engine) -> int:
    return count(engine, AuditEvent, AuditEvent.type == "delivered")


async def store_undelivered(pipeline: Pipeline, r, pids: list[str]) -> None:
    """Route predictions while their owner's inbox key holds a string: stored, their inbox write failed."""
    r.set(pipeline.keys.inbox(OWNER), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipeline.process_predictions([entry(n, pid, pipeline.clock) for n, pid in enumerate(pids, 1)])
    r.delete(pipeline.keys.inbox(OWNER))


async def test_an_alert_left_by_a_failed_inbox_write_is_delivered_once_past_the_grace(pipeline, engine, r) -> None:
    await store_undelivered(pipeline, r, ["late-1", "late-2"])
    assert undelivered(engine) == 2
    drain = OutboxDrain(pipeline)

    pipeline.clock.now += timedelta(seconds=29)  # the batch could still be delivering them
    assert await drain.drain_once() == 0
    assert not r.exists(pipeline.keys.inbox(OWNER)) and undelivered(engine) == 2

    pipeline.clock.now += timedelta(seconds=2)
    assert await drain.drain_once() == 2
    assert await drain.drain_once() == 0  # nothing left, nothing written again
    assert sorted(a.prediction_id for a in inbox(r, pipeline.keys, OWNER)) == ["late-1", "late-2"]
    assert undelivered(engine) == 0 and delivered_events(engine) == 2


async def test_a_broken_inbox_leaves_only_its_own_alerts_undelivered_and_is_logged_in_one_line(
    pipeline, engine, r
) -> None:
    now = pipeline.clock.now
    old = now - timedelta(minutes=5)
    # The broken owner's alerts first in the drain's order, more of them than a chunk holds.
    insert_alerts(engine, [alert_row(n, owner="broken", created_at=old) for n in range(5)]
                  + [alert_row(n, owner="fine", created_at=old + timedelta(seconds=1)) for n in range(5, 8)])
    r.set(pipeline.keys.inbox("broken"), "not a stream")
    drain = OutboxDrain(pipeline, chunk=2)

    with capture_logs() as logs:
        assert await drain.drain_once() == 3

    assert r.xlen(pipeline.keys.inbox("fine")) == 3
    assert undelivered(engine) == 5
    (warning,) = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert warning["event"] == "alerts left undelivered in the outbox; will retry"
    assert (warning["alerts"], warning["owners"]) == (5, ["broken"])
    assert warning["error"].startswith("ResponseError: WRONGTYPE") and "exc_info" not in warning

    r.delete(pipeline.keys.inbox("broken"))  # fixed: the next drain delivers them
    assert await drain.drain_once() == 5
    assert r.xlen(pipeline.keys.inbox("broken")) == 5 and r.xlen(pipeline.keys.inbox("fine")) == 3
    assert undelivered(engine) == 0 and delivered_events(engine) == 8


async def test_any_other_error_of_a_drain_is_one_log_line_and_an_outage_is_raised(pipeline, engine) -> None:
    drain = OutboxDrain(pipeline)
    insert_alerts(engine, [alert_row(1, created_at=pipeline.clock.now - timedelta(minutes=5))])

    async def fails(_alerts: object) -> int:
        raise ValueError("a bug\nover two lines")

    pipeline.write_to_inboxes = fails  # type: ignore[method-assign]
    with capture_logs() as logs:
        assert await drain.drain_once() == 0
    assert [(e["event"], e["error"]) for e in logs if e["log_level"] == "warning"] == [
        ("alerts left undelivered in the outbox; will retry", "ValueError: a bug over two lines")]

    async def unreachable(_alerts: object) -> int:
        raise ConnectionError("Redis is down")

    pipeline.write_to_inboxes = unreachable  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):  # the service's loop waits an outage out
        await drain.drain_once()

    def unreadable(*_args: object, **_kwargs: object) -> list:
        raise KeyError("a bug in the read")

    pipeline.undelivered_before = unreadable  # type: ignore[method-assign]
    with capture_logs() as logs:
        assert await drain.drain_once() == 0
    assert [(e["event"], e["error"], "exc_info" in e) for e in logs] == [
        ("outbox drain failed; will retry", "KeyError: 'a bug in the read'", False)]


class WorkerDied(BaseException):
    """The worker gone in the middle of a write (a crash, the OOM killer): no handler of the router's runs."""


async def test_an_alert_whose_inbox_write_stops_the_worker_each_time_is_parked_and_the_rest_delivered(
    pipeline, engine, r, monkeypatch
) -> None:
    # A poison alert: writing it kills the worker, at start and every sweep. Without a bound the start-up drain
    # never ends and the worker never routes. It is tried max_attempts times with its chunk, then on its own,
    # which names it: parked (left undelivered in the store, logged, counted), and the others go out, once.
    from decision_router import metrics

    old = pipeline.clock.now - timedelta(minutes=5)
    insert_alerts(engine, [alert_row(n, owner="fine", created_at=old + timedelta(seconds=n)) for n in range(3)])
    real = pipeline.write_to_inboxes

    async def dies_on_poison(alerts):
        if any(alert.alert_id == "al-00001" for alert in alerts):
            raise WorkerDied
        return await real(alerts)

    monkeypatch.setattr(pipeline, "write_to_inboxes", dies_on_poison)
    parked_before = metrics.OUTBOX_PARKED._value.get()
    deaths = 0
    while True:
        drain = OutboxDrain(pipeline)  # a fresh worker each time
        try:
            with capture_logs() as logs:
                delivered = await drain.drain_once(grace=timedelta(0))
        except WorkerDied:
            deaths += 1
            assert deaths <= pipeline.settings.max_attempts + 1, "the drain kept dying on the same alert"
            continue
        break

    assert deaths == pipeline.settings.max_attempts + 1  # with its chunk, then once on its own
    assert delivered == 1  # al-00000 went out, alone, before the poison: al-00002 now
    assert [json.loads(f["data"])["alert_id"] for _, f in r.xrange(pipeline.keys.inbox("fine"))] == [
        "al-00000", "al-00002"]
    assert undelivered(engine) == 1 and alert_row_delivered(engine, "al-00001") is None
    (parked,) = [e for e in logs if e["log_level"] == "error"]
    assert parked["event"].startswith("alert parked in the outbox") and parked["alert_id"] == "al-00001"
    assert metrics.OUTBOX_PARKED._value.get() == parked_before + 1
    assert r.hkeys(pipeline.keys.outbox_parked) == ["al-00001"]

    with capture_logs() as logs:
        assert await OutboxDrain(pipeline).drain_once(grace=timedelta(0)) == 0  # skipped: no death
    (skipped,) = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert skipped["event"].startswith("alerts parked in the outbox") and skipped["alert_ids"] == ["al-00001"]
    assert metrics.OUTBOX_PARKED._value.get() == parked_before + 1  # counted once

    # Its cause fixed, the operator lets it go again: delivered once.
    monkeypatch.undo()
    r.hdel(pipeline.keys.outbox_parked, "al-00001")
    assert await OutboxDrain(pipeline).drain_once(grace=timedelta(0)) == 1
    assert undelivered(engine) == 0 and r.xlen(pipeline.keys.inbox("fine")) == 3
    assert not r.exists(pipeline.keys.outbox_attempts)


def alert_row_delivered(engine: Engine, alert_id: str) -> datetime | None:
    with Session(engine) as session:
        return session.get(AlertRecord, alert_id).delivered_at


async def test_two_drains_at_once_write_and_mark_each_alert_once(pipeline, settings, ruleset, engine, r) -> None:
    old = pipeline.clock.now - timedelta(minutes=5)
    insert_alerts(engine, [alert_row(n, created_at=old + timedelta(milliseconds=n)) for n in range(60)])
    other_redis = Redis.from_url(settings.redis_url)
    other = Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=other_redis, clock=pipeline.clock)
    try:
        marked = await asyncio.gather(*(OutboxDrain(p, chunk=7).drain_once() for p in (pipeline, other)))
    finally:
        await other_redis.aclose()
    assert sum(marked) == 60
    assert r.xlen(pipeline.keys.inbox("o")) == 60
    assert len({json.loads(f["data"])["alert_id"] for _, f in r.xrange(pipeline.keys.inbox("o"))}) == 60
    assert undelivered(engine) == 0 and delivered_events(engine) == 60


@pytest.fixture
def serve_settings(settings):
    # A drain every second; an entry that keeps failing dead-lettered at its second failure.
    return settings.model_copy(update={"sweep_interval": timedelta(seconds=1), "max_attempts": 2})


async def test_serve_delivers_an_alert_its_batch_failed_to_write_without_a_restart(
    serve_settings, ruleset, engine, r
) -> None:
    clock = ManualClock(datetime.now(UTC))
    async with running_service(serve_settings, ruleset, engine, clock=clock) as service:
        keys = service.keys
        r.set(keys.inbox(OWNER), "not a stream")
        r.xadd(keys.predictions, {"data": json.dumps({**prediction("stuck-1"), "predicted_at": clock.now.isoformat()})})
        await wait_until(lambda: r.xlen(keys.predictions_dlq) == 1, what="the entry dead-lettered")
        await wait_until(lambda: not r.xpending(keys.predictions, service.group)["pending"], what="its ack")
        assert undelivered(engine) == 1
        r.delete(keys.inbox(OWNER))  # fixed; the alert is still in the outbox

        clock.now += timedelta(seconds=29)
        assert await service.outbox.drain_once() == 0  # younger than the grace (30 s): left alone
        assert undelivered(engine) == 1
        clock.now += timedelta(seconds=2)
        await wait_until(lambda: undelivered(engine) == 0, what="the periodic drain")
        assert [a.prediction_id for a in inbox(r, keys, OWNER)] == ["stuck-1"]
        assert delivered_events(engine) == 1


async def test_a_broken_inbox_does_not_keep_the_router_from_starting(serve_settings, ruleset, engine, r) -> None:
    insert_alerts(engine, [alert_row(1, owner="broken"), alert_row(2)])  # left by an earlier run
    r.set(f"{serve_settings.stream_prefix}alerts:broken", "not a stream")
    with capture_logs() as logs:
        async with running_service(serve_settings, ruleset, engine) as service:
            assert r.type(service.keys.inbox("broken")) == "string"  # the key the test broke, as expected
            assert r.xlen(service.keys.inbox("o")) == 1  # the start's drain delivered the other
            r.delete(service.keys.inbox("broken"))
            await wait_until(lambda: undelivered(engine) == 0, what="the periodic drain")
    assert any(e["event"] == "alerts left undelivered in the outbox; will retry" for e in logs)
    assert r.xlen(f"{serve_settings.stream_prefix}alerts:broken") == 1


# Two `serve` workers, each draining -------------------------------------------------------------------


@pytest.mark.postgres
def test_two_serve_workers_drain_the_outbox_once_and_leave_young_alerts_alone(
    prefix, schema, redis_server, tmp_path
) -> None:
    client = redis.Redis.from_url(redis_server)
    keys = Keys(prefix)
    router = Router(tmp_path / "router.log", workers=2, redis_url=redis_server, database_url=schema.url(),
                    stream_prefix=prefix, consumer_name="box", sweep_interval="1s")
    try:
        router.wait_started(times=2)
        now = datetime.now(UTC)
        # Stored undelivered while both workers run (as a failed inbox write leaves them), and one just now.
        insert_alerts(schema.engine, [alert_row(n, created_at=now - timedelta(minutes=5, seconds=n)) for n in range(40)]
                      + [alert_row(99, created_at=now)])
        wait_for(lambda: client.exists(keys.inbox("o")) and client.xlen(keys.inbox("o")) >= 40, timeout=30,
                 what="the periodic drains")
        wait_for(lambda: undelivered(schema.engine) == 1, timeout=30, what="the marks")
        with Session(schema.engine) as session:
            young = session.get(AlertRecord, "al-00099")
            assert young is not None and young.delivered_at is None
        ids = [json.loads(fields[b"data"])["alert_id"] for _, fields in client.xrange(keys.inbox("o"))]
        assert len(ids) == len(set(ids)) == 40 and "al-00099" not in ids
        assert delivered_events(schema.engine) == 40
        router.stop_cleanly()
        assert "failed" not in router.log(), router.log()[-3000:]
    finally:
        router.close()
        client.close()


# The drain's query -------------------------------------------------------------------------------------


def outbox_plan(engine: Engine) -> str:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    sent = sent_statements(engine, lambda session: tracker.outbox_alerts(
        session, before=now, after=(now - timedelta(hours=1), "al-00001"), limit=500))
    ((statement, parameters),) = sent
    explain = "explain query plan " if engine.dialect.name == "sqlite" else "explain "
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("set enable_seqscan = off"))  # a small table: show the index can serve it
        return "\n".join(str(row[-1]) for row in connection.exec_driver_sql(explain + statement, parameters))


def seed_a_mostly_delivered_store(engine: Engine) -> None:
    """3,000 alerts, one in 50 undelivered, with the planner's statistics up to date."""
    t0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    insert_alerts(engine, [alert_row(n, created_at=t0 - timedelta(seconds=n),
                                     delivered_at=None if n % 50 == 0 else t0) for n in range(3000)])
    with engine.begin() as connection:
        connection.execute(text("analyze"))


def test_the_drain_reads_only_the_partial_index_of_undelivered_alerts(engine: Engine) -> None:
    seed_a_mostly_delivered_store(engine)
    plan = outbox_plan(engine)
    # Through that index alone (PostgreSQL may scan it as a bitmap, then sort its few rows).
    assert set(re.findall(r"\bix_\w+", plan)) == {"ix_alerts_outbox"}, plan
    assert "SCAN alerts" not in plan and "Seq Scan" not in plan, plan
    if engine.dialect.name == "sqlite":
        assert "TEMP B-TREE" not in plan, plan  # no sort: the index is in the drain's order


def test_the_batches_read_back_their_undelivered_alerts_by_prediction_not_by_the_outbox_index(engine: Engine) -> None:
    seed_a_mostly_delivered_store(engine)
    ((statement, parameters),) = sent_statements(
        engine, lambda session: tracker.undelivered_alerts(session, prediction_ids=["p-00001", "p-00050"]))
    explain = "explain query plan " if engine.dialect.name == "sqlite" else "explain "
    with engine.connect() as connection:
        plan = "\n".join(str(row[-1]) for row in connection.exec_driver_sql(explain + statement, parameters))
    if engine.dialect.name == "sqlite":  # SQLite, without the literals, cannot use the partial index anyway
        assert re.findall(r"\bix_\w+", plan) == ["ix_alerts_prediction_id"], plan
    else:  # PostgreSQL may read either index (few undelivered alerts): never the whole table
        assert "ix_alerts_" in plan and "Seq Scan" not in plan, plan


def test_create_schema_builds_the_outbox_index_on_an_older_store(engine: Engine) -> None:
    with engine.begin() as connection:  # a store from before the periodic drain
        connection.execute(text("drop index ix_alerts_outbox"))
    assert not schema_is_current(engine)
    create_schema(engine)
    assert "ix_alerts_outbox" in index_names(engine)
    assert schema_is_current(engine)
