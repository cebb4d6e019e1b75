"""Data-quality alerts end to end on real Redis and both stores: predictions go through the
running service with a controllable clock (three reference days, then a drifted day); the
drift check sends one alert, with the figures, to the model owner's inbox, once per day
however many checks and workers find it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest
from sqlmodel import Session, select
from structlog.testing import capture_logs

from decision_router.contracts import DataQualityAlert
from decision_router.monitor import ALL_VERSIONS, data_quality_alert_id
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.tables import DataQualityAlertRecord, DeliveryRecord, PredictionRecord
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_router_loop import count

pytestmark = pytest.mark.redis

ROUTING = """
rules:
  - {name: rest, when: {}, owner: desk, action: record, context: [context.segment]}
models:
  churn: {owner: analyst, drift: {min_samples: 100}}
"""
OWNERS = """
owners:
  - {id: analyst, name: Model Owner}
  - {id: desk, name: Desk}
"""
PER_DAY = 120
# Midnight UTC, so every check below falls on the same day (alert ids are per day).
T0 = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=10)




def publish_day(r, keys, day: int, clock: ManualClock, rng: random.Random, *, score_mean: float) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(PER_DAY):
        document = {
            "prediction_id": f"d{day}-{i}", "model": "churn", "model_version": "2026.11", "entity_type": "account",
            "entity_id": f"acct-{i}", "score": min(1.0, max(0.0, rng.gauss(score_mean, 0.1))),
            "predicted_at": (clock.now - timedelta(minutes=1)).isoformat(),
            "features": {"logins_7d": rng.gauss(10, 3), "top_drivers": ["usage_drop"]},
            "context": {"segment": "enterprise"},
        }
        pipe.xadd(keys.predictions, {"data": json.dumps(document)})
    pipe.execute()


def inbox_entries(r, keys, owner: str) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(keys.inbox(owner))]


async def test_drift_alert_reaches_the_model_owner_once_a_day(settings, rules_dir, engine, r) -> None:
    clock = ManualClock(T0)
    rng = random.Random(5)
    ruleset = load_rules(rules_dir)
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "drift_interval": timedelta(hours=1)})
    async with running_service(tuned, ruleset, engine, clock=clock) as one:
        keys = one.keys
        for day in range(4):  # days 0-2: the reference; day 3: scores shifted up by 2 sd
            clock.now = T0 + timedelta(days=day)
            publish_day(r, keys, day, clock, rng, score_mean=0.6 if day == 3 else 0.4)
            stored = PER_DAY * (day + 1)
            await wait_until(lambda n=stored: count(engine, PredictionRecord) == n, what=f"day {day} stored")

        # Before the drifted day, with the reference complete: nothing to report.
        clock.now = T0 + timedelta(days=2, hours=12)
        assert not [h for h in await one.monitor.check_once() if h.flagged]
        assert r.xlen(keys.inbox("analyst")) == 0

        clock.now = T0 + timedelta(days=3, hours=1)
        health = await one.monitor.check_once()
        by_metric = {(h.model_version, h.metric): h for h in health}
        assert set(by_metric) == {
            (ALL_VERSIONS, "rejection_rate"), ("2026.11", "score"), ("2026.11", "feature:logins_7d"),
            ("2026.11", "missing_context_rate"),
        }
        assert [key for key, h in by_metric.items() if h.flagged] == [("2026.11", "score")]
        score = by_metric[("2026.11", "score")]
        assert (score.n_reference, score.n_recent) == (3 * PER_DAY, PER_DAY)

        (entry,) = inbox_entries(r, keys, "analyst")
        assert entry["kind"] == "data_quality"
        alert = DataQualityAlert.model_validate_json(entry["data"])
        assert alert.alert_id == data_quality_alert_id("churn", "2026.11", "score", clock.now.date().isoformat())
        assert (alert.model, alert.model_version, alert.metric, alert.owner) == ("churn", "2026.11", "score", "analyst")
        assert alert.value == pytest.approx(score.value) and alert.threshold == pytest.approx(score.threshold)
        assert alert.value > alert.threshold
        assert (alert.n_reference, alert.n_recent) == (3 * PER_DAY, PER_DAY)
        assert alert.window.reference_version == "2026.11"
        assert (alert.window.reference_from, alert.window.reference_to) == (T0, T0 + timedelta(days=2, hours=1))
        assert (alert.window.recent_from, alert.window.recent_to) == (clock.now - timedelta(days=1), clock.now)
        assert alert.created_at == clock.now and alert.detail == score.detail
        assert r.xlen(keys.inbox("desk")) == 0  # record rule: nothing routed there

        # Later the same day, this worker and a second one check again, concurrently (the
        # second also checks at its start): nothing more is sent or stored.
        clock.now = T0 + timedelta(days=3, hours=3)
        other = tuned.model_copy(update={"consumer_name": "worker-2"})
        async with running_service(other, ruleset, engine, clock=clock) as two:
            again = await asyncio.gather(one.monitor.check_once(), two.monitor.check_once(), one.monitor.check_once())
        assert all([h.metric for h in result if h.flagged] == ["score"] for result in again)
    assert len(inbox_entries(r, keys, "analyst")) == 1
    with Session(engine) as session:
        (record,) = session.exec(select(DataQualityAlertRecord)).all()
    assert record.alert_id == alert.alert_id and record.owner == "analyst" and record.delivered_at is not None


async def test_an_owner_added_later_the_same_day_gets_the_alert_once_from_two_workers(
    settings, rules_dir, engine, r
) -> None:
    clock = ManualClock(T0)
    rng = random.Random(5)
    owned = load_rules(rules_dir)
    # Before: churn is in no one's hands (its drift settings kept, so the day is judged as above).
    unowned = dataclasses.replace(owned, model_owners=MappingProxyType({}))
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "drift_interval": timedelta(hours=1)})
    async with running_service(tuned, unowned, engine, clock=clock) as one:
        keys = one.keys
        for day in range(4):
            clock.now = T0 + timedelta(days=day)
            publish_day(r, keys, day, clock, rng, score_mean=0.6 if day == 3 else 0.4)
            await wait_until(lambda n=PER_DAY * (day + 1): count(engine, PredictionRecord) == n, what=f"day {day} stored")
        clock.now = T0 + timedelta(days=3, hours=1)
        assert [h.metric for h in await one.monitor.check_once() if h.flagged] == ["score"]
        assert r.xlen(keys.inbox("analyst")) == 0

        # The owner is added to `models:` later that day: both workers run the new rules and check
        # at once (the second's own periodic check is off, so these two are the only ones).
        clock.now = T0 + timedelta(days=3, hours=3)
        other = tuned.model_copy(update={"consumer_name": "worker-2", "drift_interval": timedelta(0)})
        async with running_service(other, owned, engine, clock=clock) as two:
            one.pipeline.ruleset = owned
            for service in (one, two):  # a webhook for the owner: the outbox rows a worker queues show
                service.pipeline.channels = WebhookForAll(service.pipeline.channels)
            with capture_logs() as logs:
                await asyncio.gather(asyncio.to_thread(one.monitor._check), asyncio.to_thread(two.monitor._check))
            await asyncio.gather(one.monitor.deliver(), two.monitor.deliver())
    alert_id = data_quality_alert_id("churn", "2026.11", "score", clock.now.date().isoformat())
    (entry,) = inbox_entries(r, keys, "analyst")
    alert = DataQualityAlert.model_validate_json(entry["data"])
    # The alert as first stored, now with its owner.
    assert (alert.alert_id, alert.owner, alert.created_at) == (alert_id, "analyst", T0 + timedelta(days=3, hours=1))
    # One worker gave it its owner; only that one reports it and queues its deliveries.
    assert [(e["alert_id"], e["owner"]) for e in logs if e["event"] == "data-quality alert"] == [(alert_id, "analyst")]
    with Session(engine) as session:
        (record,) = session.exec(select(DataQualityAlertRecord)).all()
        deliveries = session.exec(select(DeliveryRecord.alert_id, DeliveryRecord.recipient, DeliveryRecord.channel)).all()
    assert record.owner == "analyst" and record.delivered_at is not None
    assert deliveries == [(alert_id, "analyst", "webhook")]


class WebhookForAll:
    """A service's channels as they are, except that every owner has a webhook: the monitor
    queues rows for it, which nothing sends (the service has no such receiver)."""

    def __init__(self, channels: Any) -> None:
        self.channels = channels

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channels, name)

    def channels_for(self, owner: str) -> tuple[str, ...]:
        return ("webhook",)
