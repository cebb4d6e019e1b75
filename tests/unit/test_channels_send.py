"""The retry loop and backoff schedule, without a network: a scripted sender."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from decision_router.channels.config import ReceiverBase, WebhookReceiver
from decision_router.channels.render import Renderer
from decision_router.channels.send import (
    Sender,
    WebhookSender,
    _Outcome,
    _unsigned,
    backoff_delay,
    backoff_schedule,
    parse_retry_after,
)
from decision_router.contracts import Alert
from tests.unit.test_channels_render import make_alert


class Scripted(Sender):
    """Each try takes the next item: an _Outcome to return, an exception to raise, or a
    number of seconds to hang for."""

    channel = "test"

    def __init__(self, script: list[Any], receiver: ReceiverBase | None = None, **kwargs: Any) -> None:
        self.delays: list[float] = []

        async def sleep(seconds: float) -> None:
            self.delays.append(seconds)

        kwargs.setdefault("sleep", sleep)
        kwargs.setdefault("random", lambda: 1.0)
        super().__init__("rcv", receiver or ReceiverBase(max_attempts=5, backoff_initial_s=0.5, backoff_max_s=30), **kwargs)
        self.script: Iterator[Any] = iter(script)
        self.tries = 0

    def _prepare(self, alert: Alert) -> None:
        return None

    async def _attempt(self, alert: Alert, prepared: Any, n: int) -> _Outcome:
        self.tries += 1
        step = next(self.script)
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, (int, float)):
            await asyncio.sleep(step)
            return _Outcome(ok=True, status_code=200)
        return step


OK = _Outcome(ok=True, status_code=200)
E503 = _Outcome(ok=False, status_code=503, error="HTTP 503", retryable=True)
E400 = _Outcome(ok=False, status_code=400, error="HTTP 400: bad", retryable=False)


def test_backoff_is_exponential_full_jitter_and_capped() -> None:
    top = [backoff_delay(n, initial=0.5, maximum=30, random=lambda: 1.0) for n in range(1, 10)]
    assert top == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert [backoff_delay(n, initial=0.5, maximum=30, random=lambda: 0.0) for n in range(1, 5)] == [0, 0, 0, 0]
    assert backoff_delay(3, initial=0.5, maximum=30, random=lambda: 0.25) == 0.5
    assert backoff_delay(10_000, initial=0.5, maximum=30, random=lambda: 1.0) == 30  # no overflow


def test_backoff_schedule_has_one_sleep_between_each_pair_of_tries() -> None:
    receiver = WebhookReceiver(url="https://h.example.com/", max_attempts=4, backoff_initial_s=0.1, backoff_max_s=0.3)
    assert backoff_schedule(receiver, random=lambda: 1.0) == [0.1, 0.2, 0.3]
    assert backoff_schedule(receiver.model_copy(update={"max_attempts": 1})) == []


def test_parse_retry_after() -> None:
    now = datetime(2026, 11, 25, 15, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Wed, 25 Nov 2026 15:00:12 GMT", now=now) == 12.0
    assert parse_retry_after("Wed, 25 Nov 2026 14:00:00 GMT", now=now) == 0.0  # in the past
    assert parse_retry_after("soon", now=now) is None and parse_retry_after(None) is None and parse_retry_after("-3") is None


async def test_success_on_first_try() -> None:
    sender = Scripted([OK])
    result = await sender.send(make_alert())
    assert (result.ok, result.attempts, result.status_code, result.error, result.retryable) == (True, 1, 200, None, False)
    assert (result.receiver, result.channel, result.alert_id) == ("rcv", "test", "al-e4edc45bc6ce00391e1d9437")
    assert sender.delays == [] and len(result.attempt_log) == 1 and result.attempt_log[0].n == 1


async def test_retries_transient_failures_with_the_backoff_schedule() -> None:
    sender = Scripted([E503, E503, OK])
    result = await sender.send(make_alert())
    assert result.ok and result.attempts == 3 and result.status_code == 200
    assert sender.delays == [0.5, 1.0]
    assert [(a.n, a.ok, a.status_code, a.retryable) for a in result.attempt_log] == [(1, False, 503, True), (2, False, 503, True), (3, True, 200, False)]


async def test_gives_up_after_max_attempts_and_says_retryable() -> None:
    sender = Scripted([E503] * 5)
    result = await sender.send(make_alert())
    assert (result.ok, result.attempts, result.status_code, result.retryable, result.error) == (False, 5, 503, True, "HTTP 503")
    assert sender.delays == [0.5, 1, 2, 4]  # no sleep after the last try


async def test_permanent_failure_is_not_retried() -> None:
    sender = Scripted([E400, OK])
    result = await sender.send(make_alert())
    assert (result.ok, result.attempts, result.status_code, result.retryable) == (False, 1, 400, False)
    assert sender.delays == [] and sender.tries == 1


async def test_retry_after_replaces_backoff_and_is_capped() -> None:
    limited = _Outcome(ok=False, status_code=429, error="HTTP 429", retryable=True, retry_after=3.0)
    very_limited = _Outcome(ok=False, status_code=429, error="HTTP 429", retryable=True, retry_after=3600.0)
    sender = Scripted([limited, very_limited, OK], ReceiverBase(max_attempts=3, backoff_initial_s=0.5, backoff_max_s=10))
    result = await sender.send(make_alert())
    assert result.ok and sender.delays == [3.0, 10.0]


async def test_exceptions_become_retryable_attempts() -> None:
    sender = Scripted([ConnectionRefusedError(111, "Connection refused"), OK])
    result = await sender.send(make_alert())
    assert result.ok and result.attempts == 2
    assert result.attempt_log[0].error == "ConnectionRefusedError: [Errno 111] Connection refused" and result.attempt_log[0].retryable


async def test_each_try_is_bounded_by_the_timeout() -> None:
    sender = Scripted([10.0, 10.0, 0.0], ReceiverBase(timeout_s=0.05, max_attempts=3))
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await sender.send(make_alert())
    assert loop.time() - start < 2.0
    assert result.ok and result.attempts == 3
    assert [a.error for a in result.attempt_log[:2]] == ["timeout: no complete response within 0.05s"] * 2
    assert all(40 <= a.latency_ms < 1500 for a in result.attempt_log[:2])


async def test_attempt_times_and_latency_come_from_the_injected_clocks() -> None:
    ticks = iter(range(0, 1000, 1))
    t0 = datetime(2026, 11, 25, tzinfo=UTC)
    stamps = iter(t0 + timedelta(seconds=i) for i in range(100))
    sender = Scripted([E503, OK], clock=lambda: float(next(ticks)), now=lambda: next(stamps))
    result = await sender.send(make_alert())
    assert [a.at for a in result.attempt_log] == [t0, t0 + timedelta(seconds=1)]
    assert [a.latency_ms for a in result.attempt_log] == [1000.0, 1000.0]
    assert result.latency_ms == 5000.0  # start, (t0, t1), (t2, t3), end


async def test_template_failure_is_one_permanent_attempt(tmp_path) -> None:
    (tmp_path / "webhook.json.j2").write_text("{{ alert.context['context.arr']|tojson }}")
    renderer = Renderer(tmp_path, check=False)
    sender = WebhookSender("hook", WebhookReceiver(url="http://127.0.0.1:9/"), renderer)
    try:
        result = await sender.send(make_alert(context={}))
    finally:
        await sender.aclose()
    assert (result.ok, result.attempts, result.retryable, result.status_code) == (False, 1, False, None)
    assert result.error is not None and result.error.startswith("template: template webhook.json.j2")


async def test_results_serialise_for_storage() -> None:
    document = (await Scripted([E503, OK]).send(make_alert())).model_dump_json()
    assert '"attempt_log":[{"n":1,"ok":false,"status_code":503' in document



def test_a_quoted_signature_is_taken_out_of_a_reply_excerpt() -> None:
    ours = "v1=" + "c0ffee12" * 8
    theirs = "v1=" + "9a" * 32
    assert _unsigned(f"got {ours}, expected {theirs}", ours) == "got v1=***, expected v1=***"
    # Ours however it is quoted (without its prefix, URL-encoded), and any HMAC cut short by the excerpt's end.
    assert _unsigned(f"sig={ours[3:]} raw=v1%3D{ours[3:]}", ours) == "sig=*** raw=v1%3D***"
    assert _unsigned(f"expected {theirs[:40]}", None) == "expected v1=***"
    # Not what is no HMAC: a version tag, a word after `v1=`, a longer name ending in v1.
    for text in ("api v1=ok", "schema v1=deadline", "tv1=0123456789abcdef"):
        assert _unsigned(text, ours) == text


async def test_a_credential_cut_short_by_the_reply_excerpt_is_masked_too() -> None:
    """A reply is read up to its first 300 bytes, then scrubbed: a receiver quoting the URL (a Slack
    webhook's path is its credential) just before that cut left the credential's start, no longer whole,
    in the stored error."""
    import httpx

    path_secret = "/services/T0SECRET1/B0SECRET2/XyZsEcReTtOkEnAbCdEf012345"
    url = f"https://hooks.example.com{path_secret}"
    header_secret = "api-key-0123456789abcdefSECRET"
    # Each reply ends the excerpt inside one of the credentials: the URL, its path, a header value.
    for quoted, secret in ((url, path_secret), (path_secret, path_secret), (header_secret, header_secret)):
        kept = quoted[: quoted.index(secret) + 12]  # the cut leaves the credential's first 12 characters
        body = "x" * (300 - len(kept) - len("no hook at ")) + "no hook at " + quoted + " " + "y" * 200

        def handler(request: httpx.Request, body: str = body) -> httpx.Response:
            return httpx.Response(404, stream=httpx.ByteStream(body.encode()))

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        receiver = WebhookReceiver(url=url, headers={"X-Api-Key": header_secret}, max_attempts=1)
        sender = WebhookSender("hook", receiver, client=client)
        try:
            result = await sender.send(make_alert())
        finally:
            await client.aclose()
        assert result.error is not None and result.error.startswith("HTTP 404: xxx")
        assert secret[:12] not in result.error and secret[1:5] not in result.error, (quoted, result.error[-40:])
        assert result.error.endswith("***")
