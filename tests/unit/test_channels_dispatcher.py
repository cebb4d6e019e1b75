"""The dispatcher with in-memory senders: bounded queues, isolation, callbacks, shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog.testing

from decision_router.channels.config import EmailReceiver, ReceiverBase, SmtpSettings, WebhookReceiver
from decision_router.channels.dispatcher import Dispatcher
from decision_router.channels.send import Attempt, DeliveryResult, EmailSender, Sender, WebhookSender, _Outcome
from decision_router.contracts import Alert
from tests.unit.test_channels_render import make_alert


class Gated(Sender):
    """Delivers when its gate is open; counts how many deliveries run at once."""

    channel = "test"

    def __init__(self, name: str, *, gate_open: bool = True, fail: bool = False, **policy: Any) -> None:
        super().__init__(name, ReceiverBase(**{"max_attempts": 1, **policy}))
        self.gate = asyncio.Event()
        if gate_open:
            self.gate.set()
        self.fail = fail
        self.running = 0
        self.peak = 0
        self.delivered: list[str] = []
        self.closed = False

    def _prepare(self, alert: Alert) -> None:
        return None

    async def _attempt(self, alert: Alert, prepared: Any, n: int) -> _Outcome:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        if self.fail:
            return _Outcome(ok=False, status_code=500, error="HTTP 500", retryable=True)
        self.delivered.append(alert.alert_id)
        return _Outcome(ok=True, status_code=200)

    async def aclose(self) -> None:
        self.closed = True


def alerts(n: int, prefix: str = "al") -> list[Alert]:
    return [make_alert(alert_id=f"{prefix}-{i:04d}") for i in range(n)]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_delivers_and_reports_every_result() -> None:
    results: list[tuple[str, DeliveryResult, tuple[Attempt, ...]]] = []
    sender = Gated("a", timeout_s=5)
    dispatcher = Dispatcher({"a": sender}, on_result=lambda alert, result, attempts: results.append((alert.alert_id, result, attempts)))
    for alert in alerts(10):
        assert await dispatcher.submit("a", alert)
    await dispatcher.drain()
    assert sorted(r[0] for r in results) == [f"al-{i:04d}" for i in range(10)]
    assert all(r.ok and attempts == r.attempt_log and len(attempts) == 1 for _, r, attempts in results)
    stats = dispatcher.stats()["a"]
    assert (stats.submitted, stats.delivered, stats.failed, stats.queued, stats.in_flight) == (10, 10, 0, 0, 0)
    assert await dispatcher.close() == [] and sender.closed


async def test_async_callback_is_awaited_and_failures_are_reported() -> None:
    seen: list[tuple[str, bool]] = []

    async def record(alert: Alert, result: DeliveryResult, attempts: tuple[Attempt, ...]) -> None:
        await asyncio.sleep(0)
        seen.append((alert.alert_id, result.ok))

    dispatcher = Dispatcher({"bad": Gated("bad", fail=True)}, on_result=record)
    await dispatcher.submit("bad", make_alert())
    await dispatcher.drain()
    assert seen == [("al-e4edc45bc6ce00391e1d9437", False)]
    assert dispatcher.stats()["bad"].failed == 1
    await dispatcher.close()


async def test_concurrency_is_bounded_per_receiver() -> None:
    sender = Gated("a", gate_open=False, max_concurrency=3)
    dispatcher = Dispatcher({"a": sender})
    for alert in alerts(10):
        await dispatcher.submit("a", alert)
    await settle()
    assert sender.running == 3 and dispatcher.stats()["a"].in_flight == 3 and dispatcher.stats()["a"].queued == 7
    sender.gate.set()
    await dispatcher.drain()
    assert sender.peak == 3 and len(sender.delivered) == 10
    await dispatcher.close()


async def test_full_queue_refuses_at_once() -> None:
    sender = Gated("slow", gate_open=False, max_concurrency=1, max_queue=2)
    dispatcher = Dispatcher({"slow": sender})
    batch = alerts(5)
    assert await dispatcher.submit("slow", batch[0])
    await settle()  # the worker takes it: 1 in flight, queue empty
    assert [await dispatcher.submit("slow", a) for a in batch[1:]] == [True, True, False, False]
    stats = dispatcher.stats()["slow"]
    assert (stats.in_flight, stats.queued, stats.submitted, stats.rejected) == (1, 2, 3, 2)
    sender.gate.set()
    await dispatcher.drain()
    assert sender.delivered == [a.alert_id for a in batch[:3]]
    await dispatcher.close()


async def test_a_stuck_receiver_does_not_hold_up_another() -> None:
    stuck = Gated("stuck", gate_open=False, max_concurrency=2, max_queue=20)
    healthy = Gated("healthy", max_concurrency=2)
    done: list[str] = []
    dispatcher = Dispatcher({"stuck": stuck, "healthy": healthy}, on_result=lambda a, r, _: done.append(r.receiver))
    for i, alert in enumerate(alerts(50)):
        await dispatcher.submit("healthy", alert)
        if i < 12:
            assert await dispatcher.submit("stuck", alert)
    await asyncio.wait_for(_until(lambda: done.count("healthy") == 50), timeout=5)
    assert len(healthy.delivered) == 50 and stuck.delivered == [] and "stuck" not in done
    abandoned = await dispatcher.close(timeout=0)
    assert sorted(a.alert_id for key, a in abandoned if key == "stuck") == [a.alert_id for a in alerts(12)]
    assert all(key == "stuck" for key, _ in abandoned) and stuck.closed and healthy.closed


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def test_close_waits_up_to_timeout_then_returns_the_unfinished() -> None:
    sender = Gated("a", gate_open=False, max_concurrency=1)
    dispatcher = Dispatcher({"a": sender})
    for alert in alerts(3):
        await dispatcher.submit("a", alert)
    await settle()
    asyncio.get_running_loop().call_later(0.05, sender.gate.set)
    assert await dispatcher.close(timeout=5) == []  # the gate opened within the timeout
    assert len(sender.delivered) == 3


async def test_close_without_finishing_the_queued_starts_none_of_them() -> None:
    """A rules reload retires a dispatcher this way: what is in flight gets the timeout, what waits in
    the queue is handed back at once, even when a worker frees up meanwhile."""
    sender = Gated("a", gate_open=False, max_concurrency=1)
    dispatcher = Dispatcher({"a": sender})
    first, *queued = alerts(3)
    for alert in (first, *queued):
        await dispatcher.submit("a", alert)
    await settle()
    asyncio.get_running_loop().call_later(0.05, sender.gate.set)
    abandoned = await dispatcher.close(timeout=5, finish_queued=False)
    assert sender.delivered == [first.alert_id]  # the one in flight finished
    assert [(key, a.alert_id) for key, a in abandoned] == [("a", a.alert_id) for a in queued]


async def test_unqueue_hands_back_only_what_never_started() -> None:
    """A rules reload takes the queued deliveries (a digest as one pair per alert) before the close, to
    tell them from those in flight: those never reached the receiver. The one in flight goes on."""
    sender = Gated("a", gate_open=False, max_concurrency=1)
    results: list[str] = []
    dispatcher = Dispatcher({"a": sender}, on_result=lambda alert, result, attempts: results.append(alert.alert_id))
    first, *queued = alerts(4)
    await dispatcher.submit("a", first)
    await dispatcher.submit("a", queued[0])
    await dispatcher.submit_digest("a", queued[1:])
    await settle()
    assert [(key, a.alert_id) for key, a in dispatcher.unqueue()] == [("a", a.alert_id) for a in queued]
    assert dispatcher.stats()["a"].queued == 0 and dispatcher.unqueue() == []
    sender.gate.set()
    await dispatcher.drain()
    assert sender.delivered == results == [first.alert_id]
    assert await dispatcher.close(timeout=1) == []


async def test_callback_errors_do_not_stop_the_worker() -> None:
    calls = 0

    def explode(alert: Alert, result: DeliveryResult, attempts: tuple[Attempt, ...]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("store is down")

    dispatcher = Dispatcher({"a": Gated("a", max_concurrency=1)}, on_result=explode)
    for alert in alerts(3):
        await dispatcher.submit("a", alert)
    await dispatcher.drain()
    assert calls == 3
    await dispatcher.close()


async def test_sender_crash_is_reported_as_a_failed_delivery() -> None:
    class Broken(Gated):
        async def send(self, alert: Alert) -> DeliveryResult:
            raise RuntimeError("bug")

    results: list[DeliveryResult] = []
    dispatcher = Dispatcher({"a": Broken("a")}, on_result=lambda a, r, _: results.append(r))
    await dispatcher.submit("a", make_alert())
    await dispatcher.drain()
    assert len(results) == 1 and not results[0].ok and results[0].error == "sender error: RuntimeError: bug" and results[0].retryable
    await dispatcher.close()


async def test_a_sender_crash_is_logged_and_recorded_without_the_receivers_secrets() -> None:
    """A bug's exception may quote the webhook URL (its path is the credential of a Slack webhook),
    the signing secret or a header's value: the log (traceback included) and the stored error mask them."""
    url = "https://hooks.example.com/services/T000/B000/s3cr3tpath"
    receiver = WebhookReceiver(url=url, secret="hmac-signing-secret", headers={"X-Api-Key": "key-123456789"})

    class Buggy(WebhookSender):
        async def send(self, alert: Alert) -> DeliveryResult:
            raise RuntimeError(f"cannot post to {url} with hmac-signing-secret and key-123456789")

    results: list[DeliveryResult] = []
    dispatcher = Dispatcher({"desk:webhook": Buggy("desk", receiver)}, on_result=lambda a, r, _: results.append(r))
    with structlog.testing.capture_logs() as logs:
        await dispatcher.submit("desk:webhook", make_alert())
        await dispatcher.drain()
    await dispatcher.close()
    [logged] = [e for e in logs if e["event"] == "delivery sender failed"]
    for text in (logged["exception"], results[0].error):
        assert "https://hooks.example.com/…" in text and "*** and ***" in text
        for secret in ("s3cr3tpath", "T000", "hmac-signing-secret", "key-123456789"):
            assert secret not in text
    assert "Traceback (most recent call last)" in logged["exception"] and "in send" in logged["exception"]


def test_an_email_sender_masks_the_smtp_password() -> None:
    smtp = SmtpSettings(host="127.0.0.1", port=2525, sender="a@example.com", username="u", password="smtp-pass-42")
    sender = EmailSender("desk", EmailReceiver(to=["d@example.com"]), smtp)
    assert sender.scrub("login u/smtp-pass-42 refused") == "login u/*** refused"


async def test_unknown_receiver_and_closed_dispatcher() -> None:
    dispatcher = Dispatcher({"a": Gated("a")})
    with pytest.raises(KeyError, match="unknown receiver 'b'; registered: a"):
        await dispatcher.submit("b", make_alert())
    with pytest.raises(ValueError, match="already registered"):
        dispatcher.add("a", Gated("a"))
    await dispatcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await dispatcher.submit("a", make_alert())
    assert await dispatcher.close() == []


async def test_dispatchers_share_no_state() -> None:
    one, two = Dispatcher({"a": Gated("a")}), Dispatcher({"a": Gated("a")})
    await one.submit("a", make_alert())
    await one.drain()
    assert one.stats()["a"].delivered == 1 and two.stats()["a"].submitted == 0
    await one.close()
    await two.close()


async def test_from_config_builds_one_sender_per_receiver() -> None:
    smtp = SmtpSettings(host="127.0.0.1", port=2525, sender="alerts@example.com", max_connections=3)
    receivers = {
        "alice:email": EmailReceiver(to=["alice@example.com"]),
        "desk:webhook": WebhookReceiver(url="https://h.example.com/", format="slack"),
    }
    async with Dispatcher.from_config(receivers, smtp=smtp) as dispatcher:
        assert dispatcher.receivers == ("alice:email", "desk:webhook")
        email, hook = dispatcher.sender("alice:email"), dispatcher.sender("desk:webhook")
        assert isinstance(email, EmailSender) and isinstance(hook, WebhookSender)
        assert email.name == "alice:email" and email.max_concurrency == 2 and hook.max_concurrency == 4
    with pytest.raises(ValueError, match="no SMTP settings"):
        Dispatcher.from_config({"alice:email": EmailReceiver(to=["alice@example.com"])})
