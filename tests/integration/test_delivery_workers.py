"""External deliveries when several router processes share one store (`serve --workers N`, a
`redrive deliveries` run beside `serve`): every process pumps the same channel outbox, so a
pending row must be sent by one of them only."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import DateTime, literal, select
from sqlmodel import Session

from decision_router import metrics, notify
from decision_router.notify import CLAIM_LEASE, RECEIVER_REMOVED, ChannelDelivery, queue_deliveries, redrive
from decision_router.rules import load_rules
from decision_router.streams import StreamWrite, xadd_once
from decision_router.tables import AuditEvent, DeliveryClaim, DeliveryRecord
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_channels_webhook import ReceiverState, receiver  # noqa: F401  (fixture)
from tests.integration.test_router_loop import count
from tests.unit.test_channels_render import make_alert

pytestmark = pytest.mark.redis


def am_rules(directory: Path, receiver: ReceiverState, path: str, *more_owners: str) -> Path:  # noqa: F811
    """Rules sending everything to am, whose webhook is the receiver at `path` (`/ok/...`, `/bad/...`,
    `/hang/...`), and more owners' YAML lines."""
    directory.mkdir()
    (directory / "routing.yaml").write_text("rules:\n  - {name: any, when: {}, owner: am}\n")
    (directory / "owners.yaml").write_text(
        "owners:\n"
        f"  - {{id: am, name: AM, channels: [inbox, webhook], webhook: {{url: '{receiver.url(path)}'}}}}\n"
        + "".join(f"  - {owner}\n" for owner in more_owners)
    )
    return directory


@pytest.fixture
def rules_dir(tmp_path: Path, receiver: ReceiverState) -> Path:  # noqa: F811
    return am_rules(tmp_path / "rules", receiver, "/ok/am")


def utcnow() -> datetime:
    return datetime.now(UTC)


def store_clock_is(monkeypatch: pytest.MonkeyPatch, clock: ManualClock) -> None:
    """Claims judged by `clock`, so a test can move the store's time past a lease: on PostgreSQL
    they are judged by the database's own clock, which a test cannot move."""
    monkeypatch.setattr(ChannelDelivery, "_store_time",
                        lambda self, after=timedelta(0): literal(clock() + after, DateTime(timezone=True)))


def queue(engine, n: int, now: datetime | None = None) -> list[str]:
    alerts = [make_alert(alert_id=f"al-{uuid.uuid4().hex[:24]}", owner="am") for _ in range(n)]
    with Session(engine) as session:
        for alert in alerts:
            queue_deliveries(session, alert=alert, recipient="am", channels=("webhook",), now=now or utcnow())
        session.commit()
    return [a.alert_id for a in alerts]


async def test_two_processes_pumping_one_outbox_send_each_row_once(
    settings, rules_dir, engine, receiver  # noqa: F811
) -> None:
    ruleset = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    workers = [ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=utcnow)
               for _ in range(2)]
    try:
        ids = queue(engine, 20)
        await asyncio.gather(*(w.pump() for w in workers))  # both see the rows pending
        await asyncio.gather(*(w.drain() for w in workers))
        await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 20,
                         what="every row delivered")
        sent = [r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")]
        assert sorted(sent) == sorted(ids)  # each once: none lost, none doubled
    finally:
        for w in workers:
            await w.close()
        await redis.aclose()


async def test_redrive_beside_a_running_router_sends_each_dead_letter_once(
    settings, rules_dir, engine, receiver  # noqa: F811
) -> None:
    """`redrive deliveries` puts rows back to pending while `serve` pumps the same outbox every second."""
    ruleset = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    serve, cli = (ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=utcnow)
                  for _ in range(2))
    try:
        ids = queue(engine, 10)
        with Session(engine) as session:  # dead-lettered: failed, each with its entry (and marker) on deliveries:dlq
            for row in session.scalars(select(DeliveryRecord)):
                row.status, row.finished_at = "failed", utcnow()
                session.add(row)
                assert row.id is not None
                await xadd_once(redis, [StreamWrite(serve.keys.deliveries_dlq, {"delivery_id": str(row.id)},
                                                    serve._dlq_marker(row.id, row.attempts))], ttl=settings.dedupe_ttl)
            session.commit()

        async def serve_pumps() -> None:
            while True:
                await serve.pump()
                await asyncio.sleep(0)

        pumping = asyncio.ensure_future(serve_pumps())
        try:
            done = await redrive(cli)
        finally:
            pumping.cancel()
        await serve.drain()
        assert (done.sent, done.delivered, done.pending, done.left) == (10, 10, 0, ())
        sent = [r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")]
        assert sorted(sent) == sorted(ids)  # each re-sent once, by one of the two processes
    finally:
        for w in (serve, cli):
            await w.close()
        await redis.aclose()


@pytest.mark.postgres
async def test_hosts_whose_clocks_disagree_judge_claims_by_the_databases_clock(
    settings, rules_dir, pg_engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """`serve` on several hosts sharing PostgreSQL: a host whose clock runs a minute ahead must not take
    over rows another still holds a claim on (it would send them again), and the claims of a process that
    stopped renewing them (killed) lapse after the lease on the database's clock, also for a host a minute
    behind."""
    lease = timedelta(seconds=3)
    monkeypatch.setattr("decision_router.notify.CLAIM_LEASE", lease)
    ruleset = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)

    def host(skew: timedelta) -> ChannelDelivery:
        return ChannelDelivery(settings=settings, ruleset=ruleset, engine=pg_engine, redis=redis,
                               clock=lambda: utcnow() + skew)

    killed, ahead, behind = host(timedelta(0)), host(timedelta(seconds=60)), host(timedelta(seconds=-60))
    try:
        ids = queue(pg_engine, 3)
        claimed_by = time.monotonic()  # the claims are taken after this: they hold until at least `lease` later
        assert await killed.pump() == 3
        await killed.dispatcher.close(timeout=0)  # killed: its claims stay behind, renewed no more
        assert await ahead.pump() == 0  # within the lease: its clock is past the claims' end, the database's is not
        while (taken := await behind.pump()) == 0 and time.monotonic() - claimed_by < lease.total_seconds() + 10:
            await asyncio.sleep(0.1)
        assert taken == 3, "the killed process's claims did not lapse after the lease"
        assert time.monotonic() - claimed_by >= lease.total_seconds()
        await behind.drain()
        await wait_until(lambda: count(pg_engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 3,
                         what="every row delivered")
        assert sorted(r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")) == sorted(ids)
    finally:
        for channels in (killed, ahead, behind):
            await channels.dispatcher.close(timeout=0)
        await redis.aclose()


@pytest.fixture
def two_owner_rules(tmp_path: Path, receiver: ReceiverState) -> Path:  # noqa: F811
    slow = (f"{{id: slow, name: Slow, channels: [inbox, webhook],"
            f" webhook: {{url: '{receiver.url('/hang/slow')}', timeout_s: 30}}}}")
    return am_rules(tmp_path / "rules2", receiver, "/ok/am", slow)


async def test_a_hung_receivers_backlog_in_flight_does_not_hold_up_the_others(
    settings, two_owner_rules, engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """More rows in flight to a hung receiver than one pump reads: the healthy receiver's rows still go."""
    monkeypatch.setattr("decision_router.notify.PENDING_BATCH", 8)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=settings, ruleset=load_rules(two_owner_rules), engine=engine, redis=redis,
                               clock=utcnow)
    try:
        slow = [make_alert(alert_id=f"al-slow{i:019d}", owner="slow") for i in range(12)]
        with Session(engine) as session:
            for alert in slow:
                queue_deliveries(session, alert=alert, recipient="slow", channels=("webhook",), now=utcnow())
            session.commit()
        await channels.pump()  # 8 of them in flight or queued, hanging
        ids = queue(engine, 3)
        await channels.pump()
        await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 3,
                         what="the healthy receiver's rows", timeout=10)
        assert sorted(r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")) == sorted(ids)
    finally:
        await channels.dispatcher.close(timeout=0)
        await redis.aclose()


async def test_a_killed_processs_claims_lapse_and_a_stopped_processs_are_released(
    settings, two_owner_rules, engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """Nothing lost: rows a killed process was sending go out once its claims lapse (CLAIM_LEASE);
    rows a stopped process could not finish are released at once."""
    monkeypatch.setattr("decision_router.notify.CLOSE_TIMEOUT_S", 0.2)
    ruleset = load_rules(two_owner_rules)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    clock = ManualClock(utcnow())
    store_clock_is(monkeypatch, clock)

    def process() -> ChannelDelivery:
        return ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock)

    killed, stopped, restarted = process(), process(), process()
    try:
        ids = queue(engine, 2)
        assert await killed.pump() == 2
        await killed.dispatcher.close(timeout=0)  # killed: its claims stay behind
        assert await restarted.pump() == 0  # the claims still hold
        clock.now += CLAIM_LEASE + timedelta(seconds=1)
        assert await restarted.pump() == 2
        await restarted.drain()
        assert sorted(r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")) == sorted(ids)

        hung = make_alert(alert_id="al-hung000000000000000000", owner="slow")
        with Session(engine) as session:
            queue_deliveries(session, alert=hung, recipient="slow", channels=("webhook",), now=clock())
            session.commit()
        assert await stopped.pump() == 1
        await stopped.close()  # it could not finish within CLOSE_TIMEOUT_S: released
        assert await restarted.pump() == 1
    finally:
        for channels in (killed, stopped, restarted):
            await channels.dispatcher.close(timeout=0)
        await redis.aclose()


async def test_a_reload_that_removes_a_webhook_dead_letters_its_pending_rows(
    settings, rules_dir, engine, receiver  # noqa: F811
) -> None:
    """No pump reads rows of a receiver that is gone: they are dead-lettered (counted, audited), and a
    redrive keeps them on the DLQ until the receiver is back, then sends each once."""
    with_hook = load_rules(rules_dir)
    (rules_dir / "owners.yaml").write_text("owners:\n  - {id: am, name: AM, channels: [inbox]}\n")
    without = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=settings, ruleset=with_hook, engine=engine, redis=redis, clock=utcnow)
    try:
        ids = queue(engine, 3)  # committed, not yet pumped
        assert await channels.reconfigure(without)
        await asyncio.gather(*channels._retiring)
        dead = [fields for _, fields in await redis.xrange(channels.keys.deliveries_dlq)]
        assert sorted(f["alert_id"] for f in dead) == sorted(ids)
        assert {(f["receiver"], f["error"]) for f in dead} == {("am:webhook", RECEIVER_REMOVED)}
        assert count(engine, DeliveryRecord, DeliveryRecord.status == "failed") == 3

        done = await redrive(channels)  # still no receiver: kept
        assert (done.sent, len(done.left)) == (0, 3) and "no receiver am:webhook" in done.left[0][1]
        assert await redis.xlen(channels.keys.deliveries_dlq) == 3

        assert await channels.reconfigure(with_hook)
        done = await redrive(channels)
        assert (done.sent, done.delivered, done.left) == (3, 3, ())
        assert sorted(r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")) == sorted(ids)
    finally:
        await channels.close()
        await redis.aclose()


@pytest.mark.parametrize("owner", ["am", "other"], ids=["webhook-removed", "owner-removed"])
async def test_a_receiver_removed_while_the_router_was_stopped_is_dead_lettered_at_start(
    settings, rules_dir, engine, receiver, owner  # noqa: F811
) -> None:
    """No reload sees the receiver go when the rules change between a stop and a start: the first pump
    dead-letters its pending rows as a reload would (counted, audited, on the DLQ), once however many
    processes start; a redrive sends them once the receiver is back."""
    with_hook = load_rules(rules_dir)
    ids = queue(engine, 3)  # left pending by the router that stopped
    # am keeps only its inbox, or is gone (another owner has everything): either way no receiver am:webhook.
    (rules_dir / "routing.yaml").write_text(f"rules:\n  - {{name: any, when: {{}}, owner: {owner}}}\n")
    (rules_dir / "owners.yaml").write_text(f"owners:\n  - {{id: {owner}, name: X, channels: [inbox]}}\n")
    without = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    failed_before = metrics.REGISTRY.get_sample_value("decision_router_deliveries_failed_total", {"channel": "webhook"}) or 0
    workers = [ChannelDelivery(settings=settings, ruleset=without, engine=engine, redis=redis, clock=utcnow)
               for _ in range(2)]
    try:
        await asyncio.gather(*(w.pump() for w in workers), workers[0].pump())  # two processes start
        dead = [fields for _, fields in await redis.xrange(workers[0].keys.deliveries_dlq)]
        assert sorted(f["alert_id"] for f in dead) == sorted(ids)  # each once
        assert {(f["receiver"], f["error"]) for f in dead} == {("am:webhook", RECEIVER_REMOVED)}
        assert count(engine, DeliveryRecord, DeliveryRecord.status == "failed") == 3
        assert count(engine, AuditEvent, AuditEvent.type == "delivery_failed") == 3
        failed = metrics.REGISTRY.get_sample_value("decision_router_deliveries_failed_total", {"channel": "webhook"})
        assert failed == failed_before + 3

        back = ChannelDelivery(settings=settings, ruleset=with_hook, engine=engine, redis=redis, clock=utcnow)
        workers.append(back)
        done = await redrive(back)
        assert (done.sent, done.delivered, done.left) == (3, 3, ())
        assert sorted(r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")) == sorted(ids)
    finally:
        for w in workers:
            await w.close()
        await redis.aclose()


async def test_rows_of_configured_receivers_are_sent_not_dead_lettered_at_start(
    settings, rules_dir, engine, receiver  # noqa: F811
) -> None:
    ids = queue(engine, 2)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=settings, ruleset=load_rules(rules_dir), engine=engine, redis=redis,
                               clock=utcnow)
    try:
        await channels.drain()
        assert await redis.xlen(channels.keys.deliveries_dlq) == 0
        assert sorted(r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")) == sorted(ids)
    finally:
        await channels.close()
        await redis.aclose()


async def test_a_failure_dead_lettered_during_a_redis_outage_still_reaches_the_dlq(
    settings, tmp_path, engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """The row is `failed` in the store before its DLQ entry is written: the entry is the only way a
    redrive finds it, so a Redis outage at that moment must delay it, not lose it."""
    directory = am_rules(tmp_path / "down", receiver, "/bad/am")
    real, calls = notify.xadd_once, []

    async def flaky(redis, writes, **kwargs):
        calls.append(writes)
        if len(calls) <= 2:
            raise RedisConnectionError("Connection refused")
        return await real(redis, writes, **kwargs)

    monkeypatch.setattr(notify, "xadd_once", flaky)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=settings, ruleset=load_rules(directory), engine=engine, redis=redis,
                               clock=utcnow)
    try:
        (alert_id,) = queue(engine, 1)
        await channels.drain()
        dead = [fields for _, fields in await redis.xrange(channels.keys.deliveries_dlq)]
        assert [(f["alert_id"], f["status_code"]) for f in dead] == [(alert_id, "400")] and len(calls) == 3
    finally:
        await channels.close()
        await redis.aclose()


@pytest.fixture
def failing_rules(tmp_path: Path, receiver: ReceiverState) -> Path:  # noqa: F811
    """am's webhook answers 400: each delivery fails for good at its first attempt."""
    return am_rules(tmp_path / "failing", receiver, "/bad/am")


class DlqOutage:
    """Redis unreachable for the deliveries:dlq writes while `down` (the store stays up)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down, self.refused = False, 0
        real = notify.xadd_once

        async def xadd_once(redis, writes, **kwargs):
            if self.down:
                self.refused += 1
                raise RedisConnectionError("Connection refused")
            return await real(redis, writes, **kwargs)

        monkeypatch.setattr(notify, "xadd_once", xadd_once)


def failed_ids(engine) -> list[int]:
    with Session(engine) as session:
        return sorted(i for i in session.scalars(select(DeliveryRecord.id).where(DeliveryRecord.status == "failed"))
                      if i is not None)


async def dead_letters(redis, keys) -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(keys.deliveries_dlq)]


async def test_a_dead_letter_cut_short_by_a_stop_is_written_once_at_the_next_start(
    settings, failing_rules, engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """Nothing lost: a row committed `failed` whose DLQ write a stop cancelled (Redis down) gets its entry
    at the next start, field for field as it would have been written, once however many processes start
    and however often; a failed row that has its entry gets no second one."""
    monkeypatch.setattr("decision_router.notify.CLOSE_TIMEOUT_S", 0.2)
    outage = DlqOutage(monkeypatch)
    ruleset = load_rules(failing_rules)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)

    def process() -> ChannelDelivery:
        return ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=utcnow)

    stopped = process()
    started: list[ChannelDelivery] = []
    try:
        (written,) = queue(engine, 1)
        await stopped.drain()  # fails, dead-lettered as usual
        (entry,) = await dead_letters(redis, stopped.keys)
        assert entry["alert_id"] == written

        outage.down = True
        (lost,) = queue(engine, 1)
        await stopped.pump()
        await wait_until(lambda: len(failed_ids(engine)) == 2 and outage.refused > 0, what="the failure, unwritten")
        await stopped.close()  # the DLQ write is still retrying: given up
        assert await dead_letters(redis, stopped.keys) == [entry]
        outage.down = False

        started = [process(), process()]
        await asyncio.gather(*(p.pump() for p in started), started[0].pump())  # two processes start at once
        started.append(process())
        await started[-1].pump()  # and one more, later
        first, second = await dead_letters(redis, stopped.keys)
        assert first == entry  # not written again
        with Session(engine) as session:
            row = session.get(DeliveryRecord, failed_ids(engine)[1])
            assert row is not None and row.error
        assert {k: v for k, v in second.items() if k != "payload"} == {
            "delivery_id": str(row.id), "alert_id": lost, "receiver": "am:webhook", "owner": "am",
            "channel": "webhook", "error": row.error, "status_code": "400", "attempts": "1",
        }
        assert json.loads(second["payload"]) == row.payload  # the alert as sent
        assert entry.keys() == second.keys()

        done = await redrive(started[0])  # the redrive finds it
        assert (done.sent, done.left) == (2, ())
    finally:
        for p in (stopped, *started):
            await p.close()
        await redis.aclose()


async def test_a_dead_letter_retrying_at_stop_gets_a_grace(
    settings, failing_rules, engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """A stop cancels the dispatcher's workers after CLOSE_TIMEOUT_S, not the DLQ write one of them started:
    that gets CLOSE_TIMEOUT_S more, so an outage ending meanwhile loses nothing until the next start."""
    monkeypatch.setattr("decision_router.notify.CLOSE_TIMEOUT_S", 1.0)
    outage = DlqOutage(monkeypatch)
    fast = settings.model_copy(update={"retry_backoff_max": timedelta(seconds=0.2)})
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=fast, ruleset=load_rules(failing_rules), engine=engine, redis=redis,
                               clock=utcnow)
    try:
        outage.down = True
        (alert_id,) = queue(engine, 1)
        await channels.pump()
        await wait_until(lambda: len(failed_ids(engine)) == 1 and outage.refused > 0, what="the failure, unwritten")
        closing = asyncio.ensure_future(channels.close())
        # Past the dispatcher's CLOSE_TIMEOUT_S: its workers are cancelled (waited for: a fixed 1.3 s sleep
        # could end, on a busy machine, before they were, and the test then showed nothing).
        await wait_until(lambda: all(not lane.workers for lane in channels.dispatcher._lanes.values()),
                         what="the dispatcher's workers cancelled")
        assert not closing.done() and outage.refused > 0  # the DLQ write is still retrying
        outage.down = False
        await closing
        assert [f["alert_id"] for f in await dead_letters(redis, channels.keys)] == [alert_id]
    finally:
        await channels.close()
        await redis.aclose()


async def test_a_failed_rows_dead_letter_is_rebuilt_with_its_digest(settings, rules_dir, engine) -> None:
    """The digest count is not in the row: it comes from the row's audit event."""
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    stopped, started = (ChannelDelivery(settings=settings, ruleset=load_rules(rules_dir), engine=engine, redis=redis,
                                        clock=utcnow) for _ in range(2))
    try:
        queue(engine, 2)
        with Session(engine) as session:
            rows = sorted(i for i in session.scalars(select(DeliveryRecord.id)) if i is not None)
        for row_id in rows:  # a digest of both that failed; the stop came before the DLQ writes
            stopped._record(row_id, False, "HTTP 500", 500, 3.0, (), digest=2, digest_id="dg-1")
        await started.pump()
        dead = await dead_letters(redis, started.keys)
        assert [(f["delivery_id"], f["digest"], f["status_code"]) for f in dead] == [(str(i), "2", "500") for i in rows]
    finally:
        for p in (stopped, started):
            await p.close()
        await redis.aclose()


async def test_a_failed_row_older_than_the_dedupe_ttl_is_assumed_dead_lettered(
    settings, rules_dir, engine
) -> None:
    """Its marker may have expired with its entry on the DLQ (or redriven): it is not written again."""
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    clock = ManualClock(utcnow())
    stopped, started = (ChannelDelivery(settings=settings, ruleset=load_rules(rules_dir), engine=engine, redis=redis,
                                        clock=clock) for _ in range(2))
    try:
        queue(engine, 1)
        stopped._record(failed_row := _only_row(engine), False, "HTTP 500", 500, 3.0, ())
        clock.now += settings.dedupe_ttl + timedelta(minutes=1)
        await started.pump()
        assert await dead_letters(redis, started.keys) == [] and failed_ids(engine) == [failed_row]
    finally:
        for p in (stopped, started):
            await p.close()
        await redis.aclose()


def _only_row(engine) -> int:
    with Session(engine) as session:
        (row_id,) = session.scalars(select(DeliveryRecord.id))
    assert row_id is not None
    return row_id


async def test_a_redriven_row_that_fails_again_without_a_new_attempt_is_dead_lettered_again(
    settings, rules_dir, engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """A row refused by a full queue makes no attempt, so its second failure has the attempts, and so the DLQ
    marker name, of its first: the redrive takes the marker with the entry, or the new entry would be skipped
    as a duplicate and the failure be on no DLQ."""
    ruleset = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=utcnow)

    async def refuse(*_args, **_kwargs) -> bool:
        return False  # the receiver's queue is full

    try:
        monkeypatch.setattr(channels.dispatcher, "submit", refuse)
        (alert_id,) = queue(engine, 1)
        await channels.drain()
        (first,) = await dead_letters(redis, channels.keys)
        assert (first["alert_id"], first["error"], first["attempts"]) == (alert_id, "queue full", "0")

        done = await redrive(channels)  # still full: fails again, with no new attempt
        assert (done.sent, done.delivered) == (1, 0)
        (again,) = await dead_letters(redis, channels.keys)
        assert (again["delivery_id"], again["error"], again["attempts"]) == (first["delivery_id"], "queue full", "0")
        assert failed_ids(engine) == [int(first["delivery_id"])]

        monkeypatch.undo()  # room again: the next redrive delivers it
        done = await redrive(channels)
        assert (done.sent, done.delivered, done.left) == (1, 1, ())
        assert await dead_letters(redis, channels.keys) == []
        assert [r.headers["x-decision-router-alert"] for r in receiver.to("/ok/am")] == [alert_id]
    finally:
        await channels.close()
        await redis.aclose()


async def test_a_dead_letter_of_a_row_already_re_sent_is_removed_without_sending_it_again(
    settings, rules_dir, engine, receiver  # noqa: F811
) -> None:
    """An entry whose row is no longer failed (another redrive re-sent it, and it was delivered) is stale: the
    redrive removes it and does not put the delivered row back to pending (it would be sent twice)."""
    ruleset = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=utcnow)
    try:
        (alert_id,) = queue(engine, 1)
        await channels.drain()
        await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 1,
                         what="the row delivered")
        row_id = _only_row(engine)
        await redis.xadd(channels.keys.deliveries_dlq, {"delivery_id": str(row_id), "alert_id": alert_id})
        done = await redrive(channels)
        assert (done.sent, done.left) == (0, ())
        assert await dead_letters(redis, channels.keys) == []
        assert count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 1
        assert len(receiver.to("/ok/am")) == 1  # not sent again
    finally:
        await channels.close()
        await redis.aclose()


@pytest.mark.parametrize("moved", [True, False], ids=["webhook-moved", "webhook-removed"])
async def test_a_reload_sends_no_queued_delivery_to_the_old_webhook(
    settings, rules_dir, engine, receiver, moved  # noqa: F811
) -> None:
    """A reload that moves (or removes) a webhook hands the deliveries still waiting in the old
    dispatcher's queue back to the outbox at once: they go to the new URL (or are dead-lettered as
    removed), never to the old one once a worker frees up there. Only those in flight finish there."""
    (rules_dir / "owners.yaml").write_text(
        f"owners:\n  - {{id: am, name: AM, channels: [inbox, webhook], webhook: {{url: '{receiver.url('/hang/am')}'}}}}\n")
    old = load_rules(rules_dir)
    hook = f"webhook], webhook: {{url: '{receiver.url('/ok/moved')}'}}" if moved else "]"
    (rules_dir / "owners.yaml").write_text(f"owners:\n  - {{id: am, name: AM, channels: [inbox, {hook}}}\n")
    new = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    channels = ChannelDelivery(settings=settings, ruleset=old, engine=engine, redis=redis, clock=utcnow)
    try:
        concurrency = channels.receivers["am:webhook"].max_concurrency
        ids = queue(engine, concurrency + 2)
        assert await channels.pump() == concurrency + 2
        await wait_until(lambda: len(receiver.to("/hang/am")) == concurrency, what="the old webhook's workers busy")
        retired = channels.dispatcher
        assert retired.stats()["am:webhook"].queued == 2
        assert await channels.reconfigure(new)
        await wait_until(lambda: retired.stats()["am:webhook"].queued == 0, timeout=3,
                         what="the queued deliveries handed back, not left for the old webhook")
        # Back in the outbox at once, not once the requests in flight finish or time out (CLOSE_TIMEOUT_S).
        await wait_until(lambda: count(engine, DeliveryClaim) == concurrency, timeout=3,
                         what="the queued deliveries' rows released while the old webhook still hangs")
        if moved:
            assert await channels.pump() == 2
            await wait_until(lambda: len(receiver.to("/ok/moved")) == 2, timeout=3, what="the new URL, at once")
        receiver.stop.set()  # the old webhook answers its in-flight requests, and would take more
        await asyncio.gather(*channels._retiring)
        await channels.drain()
        assert len(receiver.to("/hang/am")) == concurrency
        with Session(engine) as session:
            rows = {row.alert_id: row.status for row in session.scalars(select(DeliveryRecord))}
        late = [row_id for row_id in ids if row_id not in {json.loads(r.body)["alert_id"] for r in receiver.to("/hang/am")}]
        assert len(late) == 2
        if moved:
            assert sorted(r.headers["x-decision-router-alert"] for r in receiver.to("/ok/moved")) == sorted(late)
            assert set(rows.values()) == {"delivered"}
        else:
            dead = [fields for _, fields in await redis.xrange(channels.keys.deliveries_dlq)]
            assert sorted(f["alert_id"] for f in dead) == sorted(late)
            assert {f["error"] for f in dead} == {RECEIVER_REMOVED}
    finally:
        await channels.close()
        await redis.aclose()


async def test_a_digest_a_reload_hands_back_unsent_does_not_hold_its_receiver_another_window(
    settings, rules_dir, engine, receiver, monkeypatch  # noqa: F811
) -> None:
    """A due digest waits in the queue behind deliveries in flight to a hung webhook; a reload hands it
    back, never started. Nothing reached the receiver, so it is no send: the next pump sends the held
    alerts to the new URL at once, not a whole window later."""
    monkeypatch.setattr("decision_router.notify.CLOSE_TIMEOUT_S", 0.2)
    window = timedelta(minutes=15)
    owner = "{{id: am, name: AM, channels: [inbox, webhook], digest: 15m, webhook: {{url: '{}', timeout_s: 30}}}}"
    (rules_dir / "owners.yaml").write_text(f"owners:\n  - {owner.format(receiver.url('/hang/am'))}\n")
    old = load_rules(rules_dir)
    (rules_dir / "owners.yaml").write_text(f"owners:\n  - {owner.format(receiver.url('/ok/moved'))}\n")
    new = load_rules(rules_dir)
    redis = aioredis.from_url(settings.effective_redis_url, decode_responses=True)
    clock = ManualClock(utcnow())
    channels = ChannelDelivery(settings=settings, ruleset=old, engine=engine, redis=redis, clock=clock)
    try:
        concurrency = channels.receivers["am:webhook"].max_concurrency
        for _ in range(concurrency):  # one alert per quiet period, each sent at once: every worker hangs
            queue(engine, 1, clock())
            assert await channels.pump() == 1
            clock.now += window + timedelta(seconds=1)
        await wait_until(lambda: len(receiver.to("/hang/am")) == concurrency, what="the webhook's workers busy")
        last_send = clock.now - window - timedelta(seconds=1)
        held = queue(engine, 2, last_send + timedelta(seconds=1))  # within the window of the last send
        assert await channels.pump() == 2  # due: one digest, queued behind the hung deliveries
        retired = channels.dispatcher
        assert retired.stats()["am:webhook"].queued == 1
        assert await channels.reconfigure(new)
        await asyncio.gather(*channels._retiring)  # the digest handed back; the hung ones given up
        assert retired.stats()["am:webhook"].submitted == concurrency + 1
        assert len(receiver.to("/hang/am")) == concurrency  # the digest never reached the old webhook

        # The clock has not moved: the window since the last send that started is over, so they go now.
        assert await channels.pump() > 0, "the handed-back digest was taken for a send: held another window"
        await channels.drain()
        (digest,) = receiver.to("/ok/moved")
        assert set(held) <= {a["alert_id"] for a in json.loads(digest.body)["alerts"]}
        assert count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == concurrency + 2
    finally:
        receiver.stop.set()
        await channels.close()
        await redis.aclose()
