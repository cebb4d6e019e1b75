"""Webhook and email delivery wired into the service, against real receivers on
loopback (an HTTP server, an SMTP server) and a real Redis: the channel outbox, attempts,
the deliveries DLQ, redrive, escalated copies, and secrets kept out of alerts and audit."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlmodel import Session

from decision_router import tracker
from decision_router.channels import verify
from decision_router.notify import redrive
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.tables import AuditEvent, DeliveryAttemptRecord, DeliveryRecord
from decision_router.tracker import alert_id_for
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_channels_email import _FreePortController
from tests.integration.test_channels_webhook import ReceiverState, receiver  # noqa: F401  (fixture)
from tests.integration.test_router_loop import count

pytestmark = pytest.mark.redis

SECRET = "s3cret-for-am"
T0 = datetime.now(UTC).replace(microsecond=0)


class Mailbox:
    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def mailbox():
    box = Mailbox()
    controller = _FreePortController(box, hostname="127.0.0.1", port=0)
    controller.start()
    box.port = controller.port
    yield box
    controller.stop()


@pytest.fixture
def rules_dir(tmp_path: Path, receiver: ReceiverState) -> Path:  # noqa: F811
    directory = tmp_path / "rules"
    (directory / "secrets").mkdir(parents=True)
    (directory / "secrets" / "am.key").write_text(SECRET + "\n")
    (directory / "routing.yaml").write_text(
        "defaults: {ack_within: 1h, act_within: 4h}\n"
        "rules:\n"
        "  - {name: churn, when: {model: churn}, owner: {from: context.account_manager, fallback: am}, priority: high}\n"
        "  - {name: rest, when: {}, owner: am, action: record}\n"
    )
    (directory / "owners.yaml").write_text(
        "owners:\n"
        f"  - {{id: lead, name: Lead, email: lead@example.com, channels: [inbox, email, webhook], webhook: {{url: '{receiver.url('/ok/lead')}', format: slack}}}}\n"
        f"  - {{id: am, name: AM, manager: lead, email: am@example.com, channels: [inbox, webhook, email], webhook: {{url: '{receiver.url('/ok/am')}', secret_file: secrets/am.key}}}}\n"
        f"  - {{id: down, name: Down, manager: lead, channels: [inbox, webhook], webhook: {{url: '{receiver.url('/fail/down')}', max_attempts: 2}}}}\n"
    )
    return directory


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def svc(settings, rules_dir, engine, mailbox, clock):
    tuned = settings.model_copy(update={
        "rules_dir": rules_dir, "smtp_host": "127.0.0.1", "smtp_port": mailbox.port, "smtp_sender": "router@example.com",
        "sweep_interval": timedelta(hours=1),
    })
    async with running_service(tuned, load_rules(rules_dir), engine, clock=clock) as service:
        yield service


def publish(r, keys, pid: str, manager: str) -> None:
    r.xadd(keys.predictions, {"data": json.dumps({
        "prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": 0.9, "predicted_at": T0.isoformat(),
        "context": {"account_manager": manager},
    })})


async def test_alert_reaches_inbox_webhook_and_email(svc, r, engine, receiver, mailbox) -> None:  # noqa: F811
    publish(r, svc.keys, "w1", "am")
    await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 2, what="webhook and email")
    assert r.xlen(svc.keys.inbox("am")) == 1
    (request,) = receiver.to("/ok/am")
    body = json.loads(request.body)
    assert body["alert_id"] == alert_id_for("w1", "churn") and body["owner"] == "am"
    timestamp = request.headers["x-decision-router-timestamp"]
    signature = request.headers["x-decision-router-signature"]
    assert verify(SECRET, timestamp, request.body.decode(), signature)
    assert not verify("wrong", timestamp, request.body.decode(), signature)
    (mail,) = mailbox.messages
    assert mail["To"] == "am@example.com" and mail["From"] == "router@example.com"
    assert "acct-w1" in mail["Subject"] or "acct-w1" in mail.get_payload()[0].get_payload(decode=True).decode()
    with Session(engine) as session:
        attempts = session.scalars(select(DeliveryAttemptRecord)).all()
        audit = session.scalars(select(AuditEvent).where(AuditEvent.type == "delivered")).all()
    assert len(attempts) == 2 and all(a.ok for a in attempts)
    assert sorted(e.detail["channel"] for e in audit) == ["email", "inbox", "webhook"]
    # The secret never appears in what is stored or delivered.
    with Session(engine) as session:
        stored = json.dumps([row.payload for row in session.scalars(select(DeliveryRecord))]) + json.dumps(
            [e.detail for e in session.scalars(select(AuditEvent))])
    assert SECRET not in stored and SECRET not in r.xrange(svc.keys.inbox("am"))[0][1]["data"]


async def test_failing_receiver_is_dead_lettered_then_redriven_once(svc, r, engine, receiver) -> None:  # noqa: F811
    publish(r, svc.keys, "f1", "down")
    await wait_until(lambda: r.xlen(svc.keys.deliveries_dlq) == 1, what="the dead letter", timeout=20)
    (_, dead), = r.xrange(svc.keys.deliveries_dlq)
    assert (dead["receiver"], dead["channel"], dead["status_code"], dead["attempts"]) == ("down:webhook", "webhook", "500", "2")
    assert json.loads(dead["payload"])["alert_id"] == alert_id_for("f1", "churn")
    assert len(receiver.to("/fail/down")) == 2
    assert r.xlen(svc.keys.inbox("down")) == 1  # the inbox copy is never lost
    with Session(engine) as session:
        failed = session.scalars(select(AuditEvent).where(AuditEvent.type == "delivery_failed")).one()
    assert failed.detail["owner"] == "down" and failed.detail["status_code"] == 500

    done = await redrive(svc.pipeline.channels)
    assert (done.sent, done.delivered, done.left) == (1, 0, ())
    assert len(receiver.to("/fail/down")) == 4  # re-sent once (two attempts), no more
    assert r.xlen(svc.keys.deliveries_dlq) == 1  # dead-lettered again, the old entry removed
    assert r.xrange(svc.keys.deliveries_dlq)[0][1]["attempts"] == "4"


async def test_redrive_leaves_entries_it_cannot_resend_and_counts_only_what_it_resent(
    svc, r, settings, receiver  # noqa: F811
) -> None:
    """Malformed dead letters and unknown delivery ids are the only record of a failure: kept."""
    publish(r, svc.keys, "m1", "down")
    await wait_until(lambda: r.xlen(svc.keys.deliveries_dlq) == 1, what="the dead letter", timeout=20)
    raw = redis.Redis.from_url(settings.effective_redis_url)  # bytes: a field that is not UTF-8
    strays = [raw.xadd(svc.keys.deliveries_dlq, fields).decode() for fields in (
        {"delivery_id": "999999"}, {"foo": "bar"}, {"delivery_id": "abc"}, {"delivery_id": b"\xff\xfe"})]

    done = await redrive(svc.pipeline.channels)
    assert (done.sent, done.delivered) == (1, 0)  # the real one, which failed again
    assert done.left == (
        (strays[0], "no delivery 999999 in the store"), (strays[1], "no delivery id"),
        (strays[2], "no delivery id"), (strays[3], "no delivery id"),
    )
    entries = raw.xrange(svc.keys.deliveries_dlq)
    raw.close()
    assert [entry_id.decode() for entry_id, _ in entries[:4]] == strays  # kept, as they were
    assert entries[3][1] == {b"delivery_id": b"\xff\xfe"}
    assert len(entries) == 5 and entries[4][1][b"attempts"] == b"4"  # the real one, dead-lettered again


async def test_escalated_copy_reaches_the_managers_channels(svc, r, engine, receiver, mailbox, clock) -> None:  # noqa: F811
    publish(r, svc.keys, "e1", "am")
    await wait_until(lambda: len(receiver.to("/ok/am")) == 1, what="the owner's webhook")
    clock.now = T0 + timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).escalated == 1
    await wait_until(lambda: len(receiver.to("/ok/lead")) == 1, what="the manager's webhook")
    slack = json.loads(receiver.to("/ok/lead")[0].body)
    assert slack["blocks"] and "text" in slack
    await wait_until(lambda: len(mailbox.messages) == 2, what="the manager's email")
    assert {m["To"] for m in mailbox.messages} == {"am@example.com", "lead@example.com"}


def reassign(r, keys, alert_id: str, owner: str) -> str:
    return r.xadd(keys.outcomes, {"alert_id": alert_id, "type": "reassigned", "actor": "ops", "owner": owner})


async def test_an_alert_reassigned_back_reaches_its_first_owner_again(
    svc, r, engine, receiver, mailbox, monkeypatch  # noqa: F811
) -> None:
    """am -> lead -> am: a hand-back is a new hand-off, so am is notified again on every channel, under
    delivery ids of its own (a receiver dropping duplicates by them keeps it). A crash between its inbox
    write and the commit, and the reassignment's redelivery, still send it once."""
    publish(r, svc.keys, "h1", "am")
    alert_id = alert_id_for("h1", "churn")
    await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 2, what="am's first")
    reassign(r, svc.keys, alert_id, "lead")
    await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 4, what="lead's")

    # The first attempt at the hand-back's commit fails after its inbox write: the outcome entry is retried.
    real, failures = tracker.mark_delivered, []

    def crashing(session, delivered, **kwargs):
        if not failures:
            failures.append(delivered)
            raise RuntimeError("the store went away")
        return real(session, delivered, **kwargs)

    monkeypatch.setattr(tracker, "mark_delivered", crashing)
    entry_id = reassign(r, svc.keys, alert_id, "am")
    await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 6, what="am again")
    await wait_until(lambda: not r.xpending(svc.keys.outcomes, svc.group)["pending"], what="the outcome acknowledged")
    assert failures == [{alert_id: "am"}]

    # Redelivered once more (a crash before its ack): applied already, drained again, nothing sent again.
    entries = r.xrange(svc.keys.outcomes, min=entry_id, max=entry_id)
    assert (await svc.pipeline.process_outcomes(entries)).redelivered == 1
    await svc.pipeline.channels.drain()

    hooks = receiver.to("/ok/am")
    assert [h.headers["x-decision-router-delivery"] for h in hooks] == [f"{alert_id}:am", f"{alert_id}:am:2"]
    inbox = [json.loads(fields["data"]) for _, fields in r.xrange(svc.keys.inbox("am"))]
    assert [a["alert_id"] for a in inbox] == [alert_id, alert_id] and "handoff" not in inbox[1]
    mails = [m for m in mailbox.messages if m["To"] == "am@example.com"]
    assert len(mails) == 2 and mails[0]["Message-ID"] != mails[1]["Message-ID"]
    assert len(receiver.to("/ok/lead")) == 1
    assert count(engine, DeliveryRecord) == 6
