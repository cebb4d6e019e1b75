"""Digests: several alerts for one recipient in one message. Rendering (webhook JSON, Slack,
email), sending with the same retries and signing, the dispatcher's `submit_digest`, and
the pure grouping decision (`plan_digest`) the outbox pump uses."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import httpx
import pytest

from decision_router.channels.config import EmailReceiver, SmtpSettings, WebhookReceiver
from decision_router.channels.dispatcher import Dispatcher
from decision_router.channels.render import (
    DIGEST_EMAIL_SUBJECT,
    DIGEST_SLACK,
    SLACK_DIGEST_MAX_ALERTS,
    Renderer,
    TemplateError,
)
from decision_router.channels.send import (
    DIGEST_HEADER,
    Attempt,
    DeliveryResult,
    Digest,
    WebhookSender,
    _Outcome,
    build_digest_email,
)
from decision_router.channels.signing import verify
from decision_router.contracts import Alert, Escalation
from decision_router.notify import DigestPlan, plan_digest
from tests.unit.test_channels_dispatcher import Gated
from tests.unit.test_channels_render import make_alert, validate_slack_message


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def batch(n: int, **overrides: Any) -> list[Alert]:
    return [
        make_alert(alert_id=f"al-{i:04d}", prediction_id=f"p-{i}", entity_id=f"acct-{i}", score=0.5 + i / 1000, **overrides)
        for i in range(n)
    ]


# --- rendering -----------------------------------------------------------------------


def more_lines(message: dict[str, Any]) -> list[str]:
    return [
        e["text"] for b in message["blocks"] if b["type"] == "context" for e in b["elements"] if e["text"].startswith("and ")
    ]


def test_webhook_digest_json_holds_each_alert_as_in_the_inbox(renderer: Renderer) -> None:
    alerts = batch(3)
    body = json.loads(renderer.webhook_digest_body(alerts, "json", window_s=900.0))
    assert (body["digest"], body["count"], body["window_s"]) == (True, 3, 900)
    assert [Alert.model_validate(a) for a in body["alerts"]] == alerts
    assert body["alerts"][0] == json.loads(alerts[0].model_dump_json())
    assert json.loads(renderer.webhook_digest_body(alerts[:2], "json"))["window_s"] is None


def test_slack_digest_lists_each_alert(renderer: Renderer) -> None:
    alerts = batch(3)
    message = renderer.slack_digest_message(alerts, recipient="alice-moreau", window_s=900)
    assert validate_slack_message(message) == []
    blocks = message["blocks"]
    assert blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": "3 alerts for alice-moreau"}}
    sections = [b for b in blocks if b["type"] == "section"]
    assert len(sections) == 3
    for alert, section in zip(alerts, sections, strict=True):
        text = section["text"]["text"]
        assert f"account {alert.entity_id}" in text and str(alert.score) in text and "high" in text
        assert "enterprise-churn-risk" in text and "|2026-11-26 15:08 UTC>" in text  # act_by as a Slack date
    assert not more_lines(message)
    assert message["text"].startswith("3 alerts for alice-moreau: account acct-0, account acct-1")
    assert "one message per 15m" in json.dumps(blocks[-1])


def test_slack_digest_is_capped_within_50_blocks_with_and_k_more(renderer: Renderer) -> None:
    alerts = batch(60)
    message = renderer.slack_digest_message(alerts, window_s=900)
    assert validate_slack_message(message) == []
    blocks = message["blocks"]
    assert len(blocks) <= 50
    sections = [b for b in blocks if b["type"] == "section"]
    assert len(sections) == SLACK_DIGEST_MAX_ALERTS
    assert "acct-45" in sections[-1]["text"]["text"]
    assert more_lines(message) == [f"and {60 - SLACK_DIGEST_MAX_ALERTS} more"]
    assert blocks.index(next(b for b in blocks if b["type"] == "context")) == len(sections) + 1  # right after the list
    assert blocks[0]["text"]["text"] == "60 alerts for alice-moreau"


def test_slack_digest_at_the_cap_has_no_more_line(renderer: Renderer) -> None:
    message = renderer.slack_digest_message(batch(SLACK_DIGEST_MAX_ALERTS))
    assert validate_slack_message(message) == [] and len(message["blocks"]) <= 50
    assert not more_lines(message)


def test_slack_digest_escapes_mrkdwn(renderer: Renderer) -> None:
    alerts = [make_alert(entity_id="<!channel> & co"), make_alert(alert_id="al-2", rule="<@U123>")]
    message = renderer.slack_digest_message(alerts)
    sections = " ".join(b["text"]["text"] for b in message["blocks"] if b["type"] == "section")
    assert "<!channel>" not in sections and "&lt;!channel&gt; &amp; co" in sections
    assert "<@U123>" not in sections and "&lt;@U123&gt;" in sections
    assert "<!channel>" not in message["text"]


def test_digest_recipient_defaults_to_the_manager_of_escalated_copies(renderer: Renderer) -> None:
    escalation = Escalation(level=1, kind="ack", reason="missed", original_owner="alice-moreau", from_owner="alice-moreau", to_owner="lead")
    alerts = batch(2, escalation=escalation)
    assert renderer.email_digest(alerts).subject == "2 alerts for lead"
    assert Digest.of(alerts).recipient == "lead"
    assert renderer.email_digest(alerts, recipient="someone").subject == "2 alerts for someone"


def test_email_digest_subject_text_and_html(renderer: Renderer) -> None:
    alerts = batch(3)
    email = renderer.email_digest(alerts, recipient="alice-moreau", window_s=900)
    assert email.subject == "3 alerts for alice-moreau"
    for part in (email.text, email.html):
        for alert in alerts:
            assert f"account {alert.entity_id}" in part and alert.alert_id in part
        assert "2026-11-26 15:08 UTC" in part and "enterprise-churn-risk" in part and "15m" in part
    assert email.text.startswith("alice-moreau: 3 alerts are yours to act on (one message per 15m).")
    assert "1. [HIGH] enterprise-churn-risk: account acct-0 scored 0.5" in email.text
    assert email.html.lstrip().startswith("<!DOCTYPE html>")


def test_email_digest_html_is_escaped_and_text_is_not(renderer: Renderer) -> None:
    alerts = [make_alert(entity_id="<script>alert(1)</script>"), make_alert(alert_id="al-2", rule="a&b")]
    email = renderer.email_digest(alerts, recipient="<b>owner</b>")
    assert "<script>" not in email.html and "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "a&amp;b" in email.html and "<b>owner</b>" not in email.html and "&lt;b&gt;owner&lt;/b&gt;" in email.html
    assert "<script>alert(1)</script>" in email.text
    assert "\n" not in email.subject


def test_digest_templates_can_be_overridden(tmp_path: Path) -> None:
    (tmp_path / DIGEST_EMAIL_SUBJECT).write_text("Digest: {{ count }} for {{ owner }}, top {{ priority }}")
    (tmp_path / "webhook_digest.json.j2").write_text('{"n": {{ count }}, "ids": {{ alerts|map(attribute="alert_id")|list|tojson }}}')
    renderer = Renderer(tmp_path)
    assert set(renderer.overridden) == {DIGEST_EMAIL_SUBJECT, "webhook_digest.json.j2"}
    alerts = batch(2) + [make_alert(alert_id="al-c", priority="critical")]
    assert renderer.email_digest(alerts, recipient="alice-moreau").subject == "Digest: 3 for alice-moreau, top critical"
    assert json.loads(renderer.webhook_digest_body(alerts)) == {"n": 3, "ids": ["al-0000", "al-0001", "al-c"]}
    assert renderer.webhook_body(alerts[0]) == alerts[0].model_dump_json()  # single messages keep the default


def test_misspelt_digest_variable_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / DIGEST_SLACK).write_text('{"text": "x", "blocks": [{"type": "divider"}], "n": {{ cuont|tojson }}}')
    with pytest.raises(TemplateError, match=r"slack_digest\.json\.j2.*'cuont' is undefined"):
        Renderer(tmp_path)


def test_an_empty_digest_is_a_caller_error(renderer: Renderer) -> None:
    with pytest.raises(ValueError, match="at least one alert"):
        renderer.email_digest([])
    with pytest.raises(ValueError, match="at least one alert"):
        Digest.of([])


# --- sending -------------------------------------------------------------------------


async def test_webhook_digest_is_one_signed_request_retried_with_the_same_delivery_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) == 1 else 200, stream=httpx.ByteStream(b"ok"))

    async def no_sleep(_: float) -> None:
        return None

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    receiver = WebhookReceiver(url="https://hooks.example.com/a", secret="k3y", max_attempts=3)
    sender = WebhookSender("alice-moreau:webhook", receiver, Renderer(), client=client, sleep=no_sleep)
    alerts = batch(3)
    result = await sender.send_digest(alerts, recipient="alice-moreau", window_s=900)
    await client.aclose()
    assert (result.ok, result.attempts, result.digest, result.alert_ids) == (True, 2, 3, ("al-0000", "al-0001", "al-0002"))
    assert result.alert_id.startswith("dg-") and result.alert_id == Digest.of(alerts, recipient="alice-moreau").digest_id
    assert len(seen) == 2
    first, second = seen
    assert first.headers[DIGEST_HEADER] == "3" and "x-decision-router-alert" not in first.headers
    assert first.headers["x-decision-router-delivery"] == second.headers["x-decision-router-delivery"] == f"{result.alert_id}:alice-moreau"
    assert [r.headers["x-decision-router-attempt"] for r in seen] == ["1", "2"]
    for request in seen:
        ts, sig = request.headers["x-decision-router-timestamp"], request.headers["x-decision-router-signature"]
        assert verify("k3y", ts, request.content, sig)
    body = json.loads(second.content)
    assert body["count"] == 3 and [a["alert_id"] for a in body["alerts"]] == list(result.alert_ids)


async def test_digest_template_failure_is_one_permanent_attempt(tmp_path: Path) -> None:
    (tmp_path / "webhook_digest.json.j2").write_text("{{ alerts[0].context['context.arr']|tojson }}")
    sender = WebhookSender("hook", WebhookReceiver(url="http://127.0.0.1:9/"), Renderer(tmp_path, check=False))
    try:
        result = await sender.send_digest(batch(2, context={}))
    finally:
        await sender.aclose()
    assert (result.ok, result.attempts, result.retryable, result.digest) == (False, 1, False, 2)
    assert result.error is not None and result.error.startswith("template: template webhook_digest.json.j2")


def test_digest_email_is_one_message_with_a_stable_id() -> None:
    smtp = SmtpSettings(host="127.0.0.1", sender="Decision Router <alerts@router.example.com>")
    receiver = EmailReceiver(to=["alice.moreau@example.com"])
    alerts = batch(2, priority="normal") + [make_alert(alert_id="al-x", priority="critical")]
    digest = Digest.of(alerts, recipient="alice-moreau", window_s=900)
    message = build_digest_email(digest, Renderer(), receiver, smtp)
    again = build_digest_email(digest, Renderer(), receiver, smtp)
    assert message["Message-ID"] == again["Message-ID"] == f"<{digest.digest_id}.alice-moreau@router.example.com>"
    assert message["Subject"] == "3 alerts for alice-moreau" and message[DIGEST_HEADER] == "3"
    assert message["X-Priority"] == "1"  # the most urgent alert decides
    parsed = message_from_bytes(message.as_bytes(), policy=policy.default)
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]


def test_digest_ids_depend_on_the_alerts_and_the_copy() -> None:
    alerts = batch(2)
    one = Digest.of(alerts, recipient="a")
    assert one.digest_id == Digest.of(list(alerts), recipient="a").digest_id
    assert one.digest_id != Digest.of(alerts[:1], recipient="a").digest_id
    assert one.digest_id != Digest.of(alerts, recipient="b").digest_id


# --- dispatcher ----------------------------------------------------------------------


class DigestGated(Gated):
    """The dispatcher tests' sender, able to send digests too."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.digests: list[tuple[str, ...]] = []

    def _prepare_digest(self, digest: Digest) -> None:
        return None

    async def _attempt_digest(self, digest: Digest, prepared: Any, n: int) -> _Outcome:
        await self.gate.wait()
        if self.fail:
            return _Outcome(ok=False, status_code=500, error="HTTP 500", retryable=True)
        self.digests.append(digest.alert_ids)
        return _Outcome(ok=True, status_code=200)


async def test_submit_digest_reports_one_result_to_every_alert() -> None:
    seen: list[tuple[str, DeliveryResult, tuple[Attempt, ...]]] = []
    sender = DigestGated("a")
    dispatcher = Dispatcher({"a": sender}, on_result=lambda alert, result, attempts: seen.append((alert.alert_id, result, attempts)))
    alerts = batch(3)
    assert await dispatcher.submit_digest("a", alerts, recipient="alice-moreau", window_s=900)
    assert await dispatcher.submit("a", make_alert(alert_id="al-single"))
    await dispatcher.drain()
    assert sender.digests == [("al-0000", "al-0001", "al-0002")] and sender.delivered == ["al-single"]
    digest_results = [r for _, r, _ in seen if r.digest]
    assert [a for a, r, _ in seen if r.digest] == ["al-0000", "al-0001", "al-0002"]
    assert len({id(r) for r in digest_results}) == 1  # the same result for each alert
    assert digest_results[0].alert_ids == ("al-0000", "al-0001", "al-0002") and digest_results[0].ok
    single = next(r for a, r, _ in seen if a == "al-single")
    assert (single.digest, single.alert_ids) == (0, ("al-single",))
    stats = dispatcher.stats()["a"]
    assert (stats.submitted, stats.digests, stats.delivered) == (2, 1, 2)
    await dispatcher.close()


async def test_digest_from_a_sender_without_digest_support_is_a_failed_delivery() -> None:
    seen: list[tuple[str, DeliveryResult]] = []
    dispatcher = Dispatcher({"a": Gated("a")}, on_result=lambda alert, result, _: seen.append((alert.alert_id, result)))
    await dispatcher.submit_digest("a", batch(2))
    await dispatcher.drain()
    assert [a for a, _ in seen] == ["al-0000", "al-0001"]
    assert all(not r.ok and r.digest == 2 and "cannot send digests" in (r.error or "") for _, r in seen)
    await dispatcher.close()


async def test_an_unfinished_digest_is_abandoned_alert_by_alert() -> None:
    sender = DigestGated("a", gate_open=False, max_concurrency=1)
    dispatcher = Dispatcher({"a": sender})
    await dispatcher.submit_digest("a", batch(2))
    await dispatcher.submit_digest("a", batch(3)[2:])
    for _ in range(20):
        await asyncio.sleep(0)
    abandoned = await dispatcher.close(timeout=0)
    assert [(k, a.alert_id) for k, a in abandoned] == [("a", "al-0000"), ("a", "al-0001"), ("a", "al-0002")]


# --- the grouping decision -----------------------------------------------------------

T0 = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
W = timedelta(minutes=15)


@dataclass(frozen=True)
class Row:
    name: str
    created_at: datetime


def rows(*minutes: float) -> list[Row]:
    return [Row(f"r{i}", T0 + timedelta(minutes=m)) for i, m in enumerate(minutes)]


def names(items: tuple[Row, ...]) -> list[str]:
    return [r.name for r in items]


def test_nothing_pending_is_nothing_to_do() -> None:
    assert plan_digest([], last_sent=None, window=W, now=T0) == DigestPlan()


def test_first_alert_of_a_quiet_period_goes_at_once_and_the_rest_wait() -> None:
    plan = plan_digest(rows(0, 0, 0.5), last_sent=None, window=W, now=T0 + timedelta(minutes=1))
    assert names(plan.singles) == ["r0"] and plan.digests == ()
    assert names(plan.waiting) == ["r1", "r2"] and plan.due_at == T0 + timedelta(minutes=16)
    lone = plan_digest(rows(0), last_sent=T0 - timedelta(hours=2), window=W, now=T0)
    assert names(lone.singles) == ["r0"] and lone.waiting == () and lone.due_at is None


def test_alerts_within_the_window_of_the_last_send_wait() -> None:
    plan = plan_digest(rows(1, 2, 3), last_sent=T0, window=W, now=T0 + timedelta(minutes=14, seconds=59))
    assert (plan.singles, plan.digests) == ((), ())
    assert names(plan.waiting) == ["r0", "r1", "r2"] and plan.due_at == T0 + W


def test_held_alerts_go_as_one_digest_once_the_window_has_passed() -> None:
    pending = rows(1, 2, 3)
    plan = plan_digest(pending, last_sent=T0, window=W, now=T0 + W)  # exactly due
    assert plan.singles == () and [names(g) for g in plan.digests] == [["r0", "r1", "r2"]] and plan.waiting == ()
    late = plan_digest(pending, last_sent=T0, window=W, now=T0 + timedelta(hours=3))
    assert [names(g) for g in late.digests] == [["r0", "r1", "r2"]]


def test_an_alert_arriving_after_the_window_joins_the_held_ones() -> None:
    plan = plan_digest(rows(5, 16), last_sent=T0, window=W, now=T0 + timedelta(minutes=16))
    assert [names(g) for g in plan.digests] == [["r0", "r1"]] and plan.singles == ()


def test_a_single_held_alert_goes_as_a_normal_message() -> None:
    plan = plan_digest(rows(5), last_sent=T0, window=W, now=T0 + W)
    assert names(plan.singles) == ["r0"] and plan.digests == ()


def test_after_a_quiet_window_the_next_alert_is_single_again() -> None:
    # Sent at T0; nothing held; a new alert at T0+40m arrives in a quiet period.
    plan = plan_digest(rows(40, 40), last_sent=T0, window=W, now=T0 + timedelta(minutes=40))
    assert names(plan.singles) == ["r0"] and names(plan.waiting) == ["r1"]
    assert plan.due_at == T0 + timedelta(minutes=55)


def test_a_large_backlog_goes_as_several_digests() -> None:
    pending = rows(*[1] * 7)
    plan = plan_digest(pending, last_sent=T0, window=W, now=T0 + W, max_alerts=3)
    assert [names(g) for g in plan.digests] == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]
    assert names(plan.singles) == ["r6"]
