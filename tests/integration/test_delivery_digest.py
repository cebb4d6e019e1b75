"""Digests wired into the service, against real receivers on loopback (an HTTP server, an
SMTP server) and a real Redis, with a clock the test moves: the first alert of a quiet
period goes at once; alerts within the window wait and go out as one message when the
window has passed; a failed digest dead-letters each alert, and a redrive re-sends each
on its own."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import Session

from decision_router.channels import verify
from decision_router.notify import redrive
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.tables import AuditEvent, DeliveryAttemptRecord, DeliveryRecord
from decision_router.tracker import alert_id_for
from tests.integration.conftest import wait_until
from tests.integration.test_channels_webhook import ReceiverState, receiver  # noqa: F401  (fixture)
from tests.integration.test_delivery_channels import T0, clock, mailbox, publish  # noqa: F401  (fixtures)
from tests.integration.test_router_loop import count
from tests.unit.test_channels_render import validate_slack_message

pytestmark = pytest.mark.redis

SECRET = "digest-secret"
WINDOW = timedelta(minutes=15)


@pytest.fixture
def rules_dir(tmp_path: Path, receiver: ReceiverState) -> Path:  # noqa: F811
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "dg.key").write_text(SECRET)
    (directory / "routing.yaml").write_text(
        "defaults: {ack_within: 1h, act_within: 4h}\n"
        "rules:\n"
        "  - {name: churn, when: {model: churn}, owner: {from: context.account_manager, fallback: dg}, priority: high}\n"
        "  - {name: rest, when: {}, owner: dg, action: record}\n"
    )
    (directory / "owners.yaml").write_text(
        "owners:\n"
        f"  - {{id: dg, name: Digest, email: dg@example.com, channels: [inbox, webhook, email], digest: 15m,"
        f" webhook: {{url: '{receiver.url('/ok/dg')}', secret_file: dg.key}}}}\n"
        f"  - {{id: ds, name: Slack, channels: [inbox, webhook], digest: 15m, webhook: {{url: '{receiver.url('/ok/ds')}', format: slack}}}}\n"
        f"  - {{id: dd, name: Down, channels: [inbox, webhook], digest: 15m, webhook: {{url: '{receiver.url('/fail/dd')}', max_attempts: 2}}}}\n"
        f"  - {{id: now, name: Now, channels: [inbox, webhook], webhook: {{url: '{receiver.url('/ok/now')}'}}}}\n"
    )
    return directory


@pytest.fixture
async def svc(settings, rules_dir, engine, mailbox, clock):  # noqa: F811
    tuned = settings.model_copy(update={
        "rules_dir": rules_dir, "smtp_host": "127.0.0.1", "smtp_port": mailbox.port, "smtp_sender": "router@example.com",
        "sweep_interval": timedelta(hours=1),
    })
    async with running_service(tuned, load_rules(rules_dir), engine, clock=clock) as service:
        yield service


def rows(engine, owner: str, status: str) -> int:
    return count(engine, DeliveryRecord, DeliveryRecord.recipient == owner, DeliveryRecord.status == status)


async def test_first_alert_at_once_then_one_digest_per_window(svc, r, engine, receiver, mailbox, clock) -> None:  # noqa: F811
    channels = svc.pipeline.channels
    publish(r, svc.keys, "d1", "dg")
    await wait_until(lambda: rows(engine, "dg", "delivered") == 2, what="the first alert, at once")
    (first,) = receiver.to("/ok/dg")
    assert json.loads(first.body)["alert_id"] == alert_id_for("d1", "churn")  # a normal single message
    assert len(mailbox.messages) == 1 and "acct-d1" in mailbox.messages[0]["Subject"]

    for pid in ("d2", "d3", "d4"):
        publish(r, svc.keys, pid, "dg")
    await wait_until(lambda: r.xlen(svc.keys.inbox("dg")) == 4, what="the inbox: one entry per alert, never grouped")
    await wait_until(lambda: rows(engine, "dg", "pending") == 6, what="three alerts held for webhook and email")
    # Within the window: they wait, whoever pumps and however often.
    clock.now = T0 + WINDOW - timedelta(seconds=1)
    assert await channels.pump() == 0
    channels._last_sent.clear()  # as after a restart: the last send is read from the store
    assert await channels.pump() == 0
    assert len(receiver.to("/ok/dg")) == 1 and len(mailbox.messages) == 1

    clock.now = T0 + WINDOW + timedelta(seconds=1)
    await wait_until(lambda: rows(engine, "dg", "delivered") == 8, what="the digest")
    assert len(receiver.to("/ok/dg")) == 2, "the three alerts arrive as ONE request"
    request = receiver.to("/ok/dg")[1]
    body = json.loads(request.body)
    assert (body["digest"], body["count"], body["window_s"]) == (True, 3, 900)
    assert [a["alert_id"] for a in body["alerts"]] == [alert_id_for(p, "churn") for p in ("d2", "d3", "d4")]
    assert request.headers["x-decision-router-digest"] == "3" and "x-decision-router-alert" not in request.headers
    assert verify(SECRET, request.headers["x-decision-router-timestamp"], request.body, request.headers["x-decision-router-signature"])

    await wait_until(lambda: len(mailbox.messages) == 2, what="the digest email")
    mail = mailbox.messages[1]
    assert mail["Subject"] == "3 alerts for dg" and mail["To"] == "dg@example.com"
    text = mail.get_payload()[0].get_payload(decode=True).decode()
    assert all(f"acct-{p}" in text for p in ("d2", "d3", "d4"))

    with Session(engine) as session:
        audit = session.scalars(select(AuditEvent).where(AuditEvent.type == "delivered", AuditEvent.detail["channel"].as_string() != "inbox")).all()
        attempts = session.scalars(select(DeliveryAttemptRecord)).all()
    digested = [e for e in audit if e.detail.get("digest")]
    assert len(audit) == 8 and len(digested) == 6  # one event per alert and channel
    assert {e.detail["digest"] for e in digested} == {3} and {e.alert_id for e in digested} == {alert_id_for(p, "churn") for p in ("d2", "d3", "d4")}
    assert len({e.detail["digest_id"] for e in digested}) == 1  # the id names the group of alerts, on either channel
    assert len(attempts) == 8 and all(a.ok for a in attempts)

    # The window restarts at the digest: the next alert waits for the next digest (alone: a single message).
    publish(r, svc.keys, "d5", "dg")
    await wait_until(lambda: rows(engine, "dg", "pending") == 2, what="the next alert, held")
    assert await channels.pump() == 0
    clock.now = T0 + 2 * WINDOW + timedelta(seconds=2)
    await wait_until(lambda: len(receiver.to("/ok/dg")) == 3, what="the held alert")
    assert json.loads(receiver.to("/ok/dg")[2].body)["alert_id"] == alert_id_for("d5", "churn")


async def test_slack_digest_is_one_valid_message(svc, r, engine, receiver, clock) -> None:  # noqa: F811
    publish(r, svc.keys, "s1", "ds")
    await wait_until(lambda: len(receiver.to("/ok/ds")) == 1, what="the first alert")
    for pid in ("s2", "s3"):
        publish(r, svc.keys, pid, "ds")
    await wait_until(lambda: rows(engine, "ds", "pending") == 2, what="held alerts")
    clock.now = T0 + WINDOW
    await wait_until(lambda: len(receiver.to("/ok/ds")) == 2, what="the digest")
    message = json.loads(receiver.to("/ok/ds")[1].body)
    assert validate_slack_message(message) == []
    assert message["blocks"][0]["text"]["text"] == "2 alerts for ds"
    assert [b["type"] for b in message["blocks"]].count("section") == 2


async def test_owners_without_digest_are_not_held(svc, r, engine, receiver) -> None:  # noqa: F811
    for pid in ("n1", "n2", "n3"):
        publish(r, svc.keys, pid, "now")
    await wait_until(lambda: len(receiver.to("/ok/now")) == 3, what="three single messages at once")


async def test_failed_digest_dead_letters_each_alert_and_redrive_sends_each_alone(svc, r, engine, receiver, clock) -> None:  # noqa: F811
    publish(r, svc.keys, "f1", "dd")
    await wait_until(lambda: r.xlen(svc.keys.deliveries_dlq) == 1, what="the first alert dead-lettered", timeout=20)
    assert len(receiver.to("/fail/dd")) == 2
    for pid in ("f2", "f3"):
        publish(r, svc.keys, pid, "dd")
    await wait_until(lambda: rows(engine, "dd", "pending") == 2, what="held alerts")
    clock.now = T0 + WINDOW
    await wait_until(lambda: r.xlen(svc.keys.deliveries_dlq) == 3, what="the digest dead-lettered", timeout=20)
    digest_tries = receiver.to("/fail/dd")[2:]
    assert len(digest_tries) == 2 and all(json.loads(t.body)["count"] == 2 for t in digest_tries)
    entries = [fields for _, fields in r.xrange(svc.keys.deliveries_dlq)]
    assert [e.get("digest") for e in entries] == [None, "2", "2"]
    assert {json.loads(e["payload"])["alert_id"] for e in entries[1:]} == {alert_id_for(p, "churn") for p in ("f2", "f3")}
    with Session(engine) as session:
        failed = session.scalars(select(AuditEvent).where(AuditEvent.type == "delivery_failed")).all()
    assert sorted(e.detail.get("digest", 0) for e in failed) == [0, 2, 2]

    done = await redrive(svc.pipeline.channels)
    assert (done.sent, done.delivered, done.left) == (3, 0, ())
    redriven = receiver.to("/fail/dd")[4:]
    assert len(redriven) == 6  # each alert once, on its own (two attempts each)
    assert all("digest" not in json.loads(t.body) for t in redriven)
    assert sorted({json.loads(t.body)["alert_id"] for t in redriven}) == sorted(alert_id_for(p, "churn") for p in ("f1", "f2", "f3"))
    assert r.xlen(svc.keys.deliveries_dlq) == 3
