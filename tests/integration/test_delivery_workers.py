"""External deliveries when several router processes share one store (`serve --workers N`, a
`redrive deliveries` run beside `serve`): every process pumps the same channel outbox, so a
pending row must be sent by one of them only."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select
from sqlmodel import Session

from decision_router import metrics, notify
from decision_router.notify import CLAIM_LEASE, RECEIVER_REMOVED, ChannelDelivery, queue_deliveries, redrive
from decision_router.rules import load_rules
from decision_router.tables import AuditEvent, DeliveryRecord
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_channels_webhook import ReceiverState, receiver  # noqa: F401  (fixture)
from tests.integration.test_router_loop import count
from tests.unit.test_channels_render import make_alert

pytestmark = pytest.mark.redis


@pytest.fixture
def rules_dir(tmp_path: Path, receiver: ReceiverState) -> Path:  # noqa: F811
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "routing.yaml").write_text("rules:\n  - {name: any, when: {}, owner: am}\n")
    (directory / "owners.yaml").write_text(
        "owners:\n"
        f"  - {{id: am, name: AM, channels: [inbox, webhook], webhook: {{url: '{receiver.url('/ok/am')}'}}}}\n"
    )
    return directory


def utcnow() -> datetime:
    return datetime.now(UTC)


def queue(engine, n: int) -> list[str]:
    alerts = [make_alert(alert_id=f"al-{uuid.uuid4().hex[:24]}", owner="am") for _ in range(n)]
    with Session(engine) as session:
        for alert in alerts:
            queue_deliveries(session, alert=alert, recipient="am", channels=("webhook",), now=utcnow())
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
        with Session(engine) as session:  # dead-lettered: failed, each with its entry on deliveries:dlq
            for row in session.scalars(select(DeliveryRecord)):
                row.status, row.finished_at = "failed", utcnow()
                session.add(row)
                await redis.xadd(serve.keys.deliveries_dlq, {"delivery_id": str(row.id)})
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


@pytest.fixture
def two_owner_rules(tmp_path: Path, receiver: ReceiverState) -> Path:  # noqa: F811
    directory = tmp_path / "rules2"
    directory.mkdir()
    (directory / "routing.yaml").write_text("rules:\n  - {name: any, when: {}, owner: am}\n")
    (directory / "owners.yaml").write_text(
        "owners:\n"
        f"  - {{id: am, name: AM, channels: [inbox, webhook], webhook: {{url: '{receiver.url('/ok/am')}'}}}}\n"
        f"  - {{id: slow, name: Slow, channels: [inbox, webhook],"
        f" webhook: {{url: '{receiver.url('/hang/slow')}', timeout_s: 30}}}}\n"
    )
    return directory


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
    directory = tmp_path / "down"
    directory.mkdir()
    (directory / "routing.yaml").write_text("rules:\n  - {name: any, when: {}, owner: am}\n")
    (directory / "owners.yaml").write_text(
        "owners:\n"
        f"  - {{id: am, name: AM, channels: [inbox, webhook], webhook: {{url: '{receiver.url('/bad/am')}'}}}}\n"
    )
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
