"""Data-quality alerts through the owner's webhook and email, end to end: the running service
with a controllable clock stores three reference days and a drifted day; the drift check sends
the alert, with its figures, to the model owner's webhook (a loopback HTTP receiver) and email
(an aiosmtpd mailbox) through the channel outbox, and a failing webhook dead-letters it onto
deliveries:dlq, from where a redrive re-sends it."""

from __future__ import annotations

import contextlib
import json
import random
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from decision_router.contracts import DataQualityAlert
from decision_router.monitor import data_quality_alert_id
from decision_router.notify import redrive
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.tables import AuditEvent, DeliveryRecord, PredictionRecord
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_channels_webhook import ReceiverState, receiver  # noqa: F401  (fixture)
from tests.integration.test_delivery_channels import mailbox  # noqa: F401  (fixture)
from tests.integration.test_monitor import PER_DAY, ROUTING, T0, publish_day
from tests.integration.test_router_loop import count

pytestmark = pytest.mark.redis


def write_rules(tmp_path: Path, webhook_url: str) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "routing.yaml").write_text(ROUTING)
    (directory / "owners.yaml").write_text(
        "owners:\n"
        "  - {id: analyst, name: Model Owner, email: analyst@example.com, channels: [inbox, webhook, email],"
        f" webhook: {{url: '{webhook_url}', max_attempts: 2}}, digest: 15m}}\n"
        "  - {id: desk, name: Desk}\n"
    )
    return directory


@contextlib.asynccontextmanager
async def drifted_service_check(settings, rules_dir: Path, engine, r, mailbox):  # noqa: F811
    """Run the service through three reference days and a drifted one; yields the service,
    its clock and the figures of the drift check of the drifted day."""
    clock = ManualClock(T0)
    rng = random.Random(5)
    tuned = settings.model_copy(update={
        "rules_dir": rules_dir, "drift_interval": timedelta(hours=1), "smtp_host": "127.0.0.1",
        "smtp_port": mailbox.port, "smtp_sender": "router@example.com", "sweep_interval": timedelta(hours=1),
    })
    async with running_service(tuned, load_rules(rules_dir), engine, clock=clock) as service:
        for day in range(4):  # days 0-2: the reference; day 3: scores shifted up by 2 sd
            clock.now = T0 + timedelta(days=day)
            publish_day(r, service.keys, day, clock, rng, score_mean=0.6 if day == 3 else 0.4)
            await wait_until(lambda n=PER_DAY * (day + 1): count(engine, PredictionRecord) == n, what=f"day {day} stored")
        clock.now = T0 + timedelta(days=3, hours=1)
        health = await service.monitor.check_once()
        yield service, clock, health


async def test_data_quality_alert_reaches_the_owners_webhook_and_email(
    settings, tmp_path, engine, r, receiver, mailbox  # noqa: F811
) -> None:
    rules_dir = write_rules(tmp_path, receiver.url("/ok/analyst"))
    async with drifted_service_check(settings, rules_dir, engine, r, mailbox) as (service, clock, health):
        (score,) = [h for h in health if h.flagged]
        alert_id = data_quality_alert_id("churn", "2026.11", "score", clock.now.date().isoformat())
        await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 2, what="webhook and email")

        (request,) = receiver.to("/ok/analyst")
        assert request.headers["x-decision-router-alert"] == alert_id
        body = json.loads(request.body)
        assert body["kind"] == "data_quality"
        alert = DataQualityAlert.model_validate(body)
        assert (alert.alert_id, alert.model, alert.model_version, alert.metric, alert.owner) == (
            alert_id, "churn", "2026.11", "score", "analyst")
        assert alert.value == pytest.approx(score.value) and alert.threshold == pytest.approx(score.threshold)
        assert alert.value > alert.threshold
        assert (alert.n_reference, alert.n_recent) == (3 * PER_DAY, PER_DAY)
        assert (alert.window.recent_from, alert.window.recent_to) == (clock.now - timedelta(days=1), clock.now)
        assert alert.detail == score.detail
        # The inbox entry is the same document.
        ((_, entry),) = r.xrange(service.keys.inbox("analyst"))
        assert DataQualityAlert.model_validate_json(entry["data"]) == alert

        (mail,) = mailbox.messages
        assert mail["To"] == "analyst@example.com" and mail["X-Decision-Router-Alert"] == alert_id
        assert mail["Subject"].startswith("[DATA QUALITY] churn 2026.11 score: PSI ")
        text = mail.get_payload()[0].get_payload(decode=True).decode()
        assert f"{score.value:.4f}" in text and f"{score.threshold:.4f}" in text and f"{3 * PER_DAY} reference, {PER_DAY} recent" in text

        with Session(engine) as session:
            channels = sorted(e.detail["channel"] for e in session.exec(
                select(AuditEvent).where(AuditEvent.alert_id == alert_id, AuditEvent.type == "delivered")))
        assert channels == ["email", "webhook"]

        # Checked again the same day: stored once, so sent once.
        clock.now += timedelta(hours=2)
        await service.monitor.check_once()
        await service.pipeline.channels.drain()
        assert len(receiver.to("/ok/analyst")) == 1 and len(mailbox.messages) == 1
        assert count(engine, DeliveryRecord) == 2


async def test_failed_data_quality_delivery_is_dead_lettered_and_redriven(
    settings, tmp_path, engine, r, receiver, mailbox  # noqa: F811
) -> None:
    rules_dir = write_rules(tmp_path, receiver.url("/fail/analyst"))
    async with drifted_service_check(settings, rules_dir, engine, r, mailbox) as (service, clock, _):
        alert_id = data_quality_alert_id("churn", "2026.11", "score", clock.now.date().isoformat())
        await wait_until(lambda: r.xlen(service.keys.deliveries_dlq) == 1, what="the dead letter", timeout=20)
        ((_, dead),) = r.xrange(service.keys.deliveries_dlq)
        assert (dead["receiver"], dead["alert_id"], dead["status_code"], dead["attempts"]) == (
            "analyst:webhook", alert_id, "500", "2")
        assert json.loads(dead["payload"])["kind"] == "data_quality"
        await wait_until(lambda: len(mailbox.messages) == 1, what="the email, unaffected")

        done = await redrive(service.pipeline.channels)
        assert (done.sent, done.delivered, done.left) == (1, 0, ())
        assert len(receiver.to("/fail/analyst")) == 4  # re-sent once (two attempts)
        assert all(json.loads(req.body)["alert_id"] == alert_id for req in receiver.to("/fail/analyst"))
        assert r.xrange(service.keys.deliveries_dlq)[0][1]["attempts"] == "4"
