"""Per-receiver queues and workers, so one slow or dead receiver never slows the others.

Each receiver key gets its own bounded `asyncio.Queue` (`max_queue`) and its own
`max_concurrency` worker tasks, and (webhooks) its own HTTP connection pool. A receiver
that times out only fills its own queue; `submit` to it then returns False at once and the
caller dead-letters the alert ("queue full"). No state is shared between dispatchers.

    dispatcher = Dispatcher.from_config(receivers, smtp=smtp, renderer=Renderer(rules_dir / "templates"), on_result=record)
    if not await dispatcher.submit("alice-moreau:email", alert):
        ...  # dead-letter: queue full
    await dispatcher.submit_digest("alice-moreau:email", [alert1, alert2, alert3], window_s=900)
    ...
    abandoned = await dispatcher.close(timeout=5)
"""

from __future__ import annotations

import asyncio
import inspect
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from decision_router.channels.config import EmailReceiver, SmtpSettings, WebhookReceiver
from decision_router.channels.render import Renderer
from decision_router.channels.send import (
    Attempt,
    DeliveryResult,
    Digest,
    EmailSender,
    Sender,
    WebhookSender,
)
from decision_router.contracts import Alert, AnyAlert

__all__ = ["Dispatcher", "LaneStats", "OnResult", "QUEUE_FULL"]

log = structlog.get_logger(__name__)

# The dead-letter reason for a refused submit, for callers that want one spelling.
QUEUE_FULL = "queue full"

OnResult = Callable[[AnyAlert, DeliveryResult, tuple[Attempt, ...]], Awaitable[None] | None]


@dataclass
class LaneStats:
    queued: int = 0  # waiting for a worker
    in_flight: int = 0  # being delivered (including backoff sleeps)
    submitted: int = 0  # accepted by submit()
    rejected: int = 0  # refused by submit(): queue full
    delivered: int = 0  # finished ok
    failed: int = 0  # finished not ok
    digests: int = 0  # of the submitted, how many were digests (several alerts, one message)


Item = AnyAlert | Digest  # a single alert (routed or data-quality), or a digest of routed alerts


def _alerts(item: Item) -> tuple[AnyAlert, ...]:
    return item.alerts if isinstance(item, Digest) else (item,)


class _Lane:
    def __init__(self, key: str, sender: Sender) -> None:
        self.key = key
        self.sender = sender
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=sender.max_queue)
        self.workers: list[asyncio.Task[None]] = []
        self.current: list[Item | None] = [None] * sender.max_concurrency
        self.stats = LaneStats()


class Dispatcher:
    """Delivers alerts to named receivers, each through its own queue and workers.

    `senders` maps a receiver key (any string the caller routes by, e.g.
    "alice-moreau:webhook") to a `Sender`; the dispatcher owns them and closes them in
    `close()`. `on_result(alert, result, attempts)` is called (and awaited when it returns
    an awaitable) once per finished delivery, successful or not, from the receiver's
    worker; an exception it raises is logged and does not stop the worker. A digest
    (`submit_digest`) is one delivery of several alerts: `on_result` is called once for
    each of its alerts, in order, with the same result (`result.digest` is the count and
    `result.alert_ids` lists them all).
    """

    def __init__(self, senders: Mapping[str, Sender] | None = None, *, on_result: OnResult | None = None) -> None:
        self._lanes: dict[str, _Lane] = {}
        self._on_result = on_result
        self._closed = False
        for key, sender in (senders or {}).items():
            self.add(key, sender)

    @classmethod
    def from_config(
        cls,
        receivers: Mapping[str, WebhookReceiver | EmailReceiver],
        *,
        smtp: SmtpSettings | None = None,
        renderer: Renderer | None = None,
        on_result: OnResult | None = None,
        **sender_options: Any,
    ) -> Dispatcher:
        """One sender per receiver, sharing one renderer and (email) one SMTP connection
        limit of `smtp.max_connections`. `sender_options` (sleep, random, ...) go to every
        sender."""
        renderer = renderer or Renderer()
        limiter = asyncio.Semaphore(smtp.max_connections) if smtp is not None else None
        senders: dict[str, Sender] = {}
        for key, receiver in receivers.items():
            if isinstance(receiver, WebhookReceiver):
                senders[key] = WebhookSender(key, receiver, renderer, **sender_options)
            elif isinstance(receiver, EmailReceiver):
                if smtp is None:
                    raise ValueError(f"receiver {key!r} is an email receiver, but no SMTP settings were given")
                senders[key] = EmailSender(key, receiver, smtp, renderer, limiter=limiter, **sender_options)
            else:
                raise TypeError(f"receiver {key!r}: unsupported configuration {type(receiver).__name__}")
        return cls(senders, on_result=on_result)

    # --- set-up --------------------------------------------------------------------

    def add(self, key: str, sender: Sender) -> None:
        """Register a receiver; its workers start with its first submit."""
        if self._closed:
            raise RuntimeError("dispatcher is closed")
        if key in self._lanes:
            raise ValueError(f"receiver {key!r} is already registered")
        self._lanes[key] = _Lane(key, sender)

    @property
    def receivers(self) -> tuple[str, ...]:
        return tuple(self._lanes)

    def sender(self, key: str) -> Sender:
        return self._lane(key).sender

    def _lane(self, key: str) -> _Lane:
        try:
            return self._lanes[key]
        except KeyError:
            raise KeyError(f"unknown receiver {key!r}; registered: {', '.join(self._lanes) or 'none'}") from None

    # --- delivering ----------------------------------------------------------------

    async def submit(self, receiver_key: str, alert: AnyAlert) -> bool:
        """Queue `alert` (an `Alert` or a `DataQualityAlert`) for `receiver_key`. Returns at
        once: True when queued, False when that receiver's queue is full (the caller
        dead-letters it with `QUEUE_FULL`)."""
        return self._put(receiver_key, alert)

    async def submit_digest(
        self,
        receiver_key: str,
        alerts: Sequence[Alert] | Digest,
        *,
        recipient: str | None = None,
        window_s: float | None = None,
    ) -> bool:
        """Queue several alerts for `receiver_key` as one digest: one request or email, with
        the same retries and signing as a single alert, taking one queue slot. Returns at
        once: True when queued, False when the queue is full (dead-letter each alert)."""
        return self._put(receiver_key, Digest.of(alerts, recipient=recipient, window_s=window_s))

    def _put(self, receiver_key: str, item: Item) -> bool:
        if self._closed:
            raise RuntimeError("dispatcher is closed")
        lane = self._lane(receiver_key)
        try:
            lane.queue.put_nowait(item)
        except asyncio.QueueFull:
            lane.stats.rejected += 1
            return False
        lane.stats.submitted += 1
        if isinstance(item, Digest):
            lane.stats.digests += 1
        if not lane.workers:
            lane.workers = [
                asyncio.create_task(self._work(lane, i), name=f"deliver:{lane.key}:{i}") for i in range(lane.sender.max_concurrency)
            ]
        return True

    async def _work(self, lane: _Lane, slot: int) -> None:
        while True:
            item = await lane.queue.get()
            lane.current[slot] = item
            try:
                if isinstance(item, Digest):
                    ident, count, send = item.digest_id, len(item), lane.sender.send_digest(item)
                else:
                    ident, count, send = item.alert_id, 0, lane.sender.send(item)
                try:
                    result = await send
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a sender bug: still report the delivery as failed
                    # Formatted here, so that the receiver's URL and secrets can be taken out of it.
                    log.error("delivery sender failed", receiver=lane.key, alert_id=ident,
                              exception=lane.sender.scrub("".join(traceback.format_exception(exc)).rstrip()))
                    result = DeliveryResult(
                        receiver=lane.sender.name,
                        channel=lane.sender.channel,
                        alert_id=ident,
                        alert_ids=tuple(a.alert_id for a in _alerts(item)),
                        digest=count,
                        ok=False,
                        attempts=0,
                        error=lane.sender.scrub(f"sender error: {type(exc).__name__}: {exc}")[:500],
                        latency_ms=0.0,
                        retryable=True,
                    )
                if result.ok:
                    lane.stats.delivered += 1
                else:
                    lane.stats.failed += 1
                for alert in _alerts(item):
                    await self._report(lane, alert, result)
            finally:
                lane.current[slot] = None
                lane.queue.task_done()

    async def _report(self, lane: _Lane, alert: AnyAlert, result: DeliveryResult) -> None:
        if self._on_result is None:
            return
        try:
            outcome = self._on_result(alert, result, result.attempt_log)
            if inspect.isawaitable(outcome):
                await outcome
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery on_result callback failed", receiver=lane.key, alert_id=alert.alert_id, ok=result.ok)

    # --- observing and stopping ----------------------------------------------------

    def stats(self) -> dict[str, LaneStats]:
        """A snapshot per receiver key."""
        out = {}
        for key, lane in self._lanes.items():
            s = lane.stats
            in_flight = sum(1 for a in lane.current if a is not None)
            out[key] = LaneStats(lane.queue.qsize(), in_flight, s.submitted, s.rejected, s.delivered, s.failed, s.digests)
        return out

    async def drain(self) -> None:
        """Wait until every queued and in-flight delivery has finished (and been reported)."""
        await asyncio.gather(*(lane.queue.join() for lane in self._lanes.values()))

    async def close(self, timeout: float | None = 10.0, *, finish_queued: bool = True) -> list[tuple[str, AnyAlert]]:
        """Stop accepting alerts, give queued and in-flight deliveries up to `timeout`
        seconds (None: wait for all; 0: none) to finish, cancel the rest and close the
        senders. Returns the (receiver key, alert) pairs that did not finish and were not
        reported, so the caller can leave them undelivered (an in-flight one may have
        reached the receiver; receivers dedupe on X-Decision-Router-Delivery). An
        unfinished digest appears as one pair per alert.

        `finish_queued=False`: only the in-flight deliveries get the `timeout`; the queued
        ones are returned at once, never started (a rules reload that moved a receiver
        must not send them to its old address)."""
        if self._closed:
            return []
        self._closed = True
        lanes = list(self._lanes.values())
        abandoned: list[tuple[str, AnyAlert]] = []
        if not finish_queued:
            abandoned += self.unqueue()
        if timeout is None or timeout > 0:
            try:
                await asyncio.wait_for(self.drain(), timeout)
            except TimeoutError:
                pass
        for lane in lanes:
            abandoned += [(lane.key, a) for item in lane.current if item is not None for a in _alerts(item)]
            abandoned += self._unqueue(lane)
            for task in lane.workers:
                task.cancel()
        await asyncio.gather(*(t for lane in lanes for t in lane.workers), return_exceptions=True)
        for lane in lanes:
            lane.workers = []
        await asyncio.gather(*(lane.sender.aclose() for lane in lanes), return_exceptions=True)
        return abandoned

    def unqueue(self) -> list[tuple[str, AnyAlert]]:
        """Take every queued delivery, not yet started, off the queues and return it as (receiver key,
        alert) pairs, unreported (a digest as one pair per alert): none of them reached its receiver.
        Deliveries in flight go on."""
        return [pair for lane in self._lanes.values() for pair in self._unqueue(lane)]

    @staticmethod
    def _unqueue(lane: _Lane) -> list[tuple[str, AnyAlert]]:
        """Take every queued, not yet started item off the lane, as (key, alert) pairs."""
        taken: list[tuple[str, AnyAlert]] = []
        while not lane.queue.empty():
            taken += [(lane.key, a) for a in _alerts(lane.queue.get_nowait())]
            lane.queue.task_done()
        return taken

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
