"""Delivery to owners' external channels (webhook, email), after the inbox.

Every delivery is a row in the `deliveries` table first (the channel outbox, written in
the same transaction that marks the inbox delivery), then handed to the channel
dispatcher (one bounded queue and worker pool per receiver, retries with backoff). Each
attempt is recorded; a delivery that fails for good is an audit event and an entry on
`deliveries:dlq`, from which `decision-router redrive deliveries` re-sends it once.
Pending rows left by a crash are sent again at start (receivers dedupe on the
X-Decision-Router-Delivery header).

Digests: an owner with `digest: <window>` in owners.yaml gets webhook and email alerts
grouped (the inbox stream is not). The first alert after a quiet period (nothing sent to
that receiver within the window) goes out at once, on its own; alerts that arrive within
the window of the last send wait in the outbox and go out together, as one message, once
the window has passed since that send (`plan_digest`). The last send is read from the
store (the receiver's latest finished row), so a restart keeps the window. Every row of a
digest gets the digest's result, attempts and audit event (`digest: n`); a failed digest
dead-letters each row, and a redrive re-sends each on its own.

Data-quality alerts (monitor.py) take the same path: `DataQualityMonitor` queues a row per
channel of the model's owner, its payload the `DataQualityAlert` JSON (`kind:
data_quality`), in the transaction that stores the alert. They are always sent on their
own, never in a digest (a send still counts as the receiver's last send for its window);
failures, the DLQ and redrive are as for any row.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import structlog
from pydantic import SecretStr, ValidationError
from sqlalchemy import DateTime, and_, delete, exists, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from decision_router import metrics
from decision_router.channels import (
    QUEUE_FULL,
    Attempt,
    DeliveryResult,
    Dispatcher,
    EmailReceiver,
    Renderer,
    SmtpSettings,
    WebhookReceiver,
)
from decision_router.contracts import Alert, AnyAlert, DataQualityAlert, alert_from_payload
from decision_router.echo import validation_problems
from decision_router.keys import Keys
from decision_router.rules import Owner, RuleSet
from decision_router.settings import ENV_PREFIX, Settings, SettingsError
from decision_router.streams import StreamWrite, as_text, xadd_once
from decision_router.tables import AuditEvent, DeliveryAttemptRecord, DeliveryClaim, DeliveryRecord, as_utc
from decision_router.tracker import SYSTEM_ACTOR

log = structlog.get_logger("decision_router.notify")

EXTERNAL = ("webhook", "email")
# The most alerts in one digest message; a larger backlog goes out as several digests.
MAX_DIGEST_ALERTS = 500
# Pending rows read per pump: for receivers without a digest, and for those with one (their
# rows wait in the outbox, so they are read apart and never hold up the others).
PENDING_BATCH = 1000
DIGEST_PENDING_BATCH = 5000
# How long a dispatcher being closed (at stop, or replaced by a rules reload) may take to
# finish the deliveries in hand; the rest stay pending in the outbox. DLQ writes still retrying
# through a Redis outage get as long again at stop; the rest are written at the next start.
CLOSE_TIMEOUT_S = 5.0
# How long a process's claim on a row it is sending holds without renewal (each pump renews it, and
# a drain every CLAIM_RENEW_S): a row claimed by a process that was killed is sent again after this.
# Measured on the store's clock (`ChannelDelivery._store_time`), the one clock all processes share.
CLAIM_LEASE = timedelta(seconds=15)
CLAIM_RENEW_S = 3.0
# The dead-letter reason of a row left pending for a receiver that a rules reload removed (or that was
# removed from the owner directory while the router was stopped: the same reason, found at start).
RECEIVER_REMOVED = "receiver removed by a rules reload"
# The copy part of the delivery key of an alert handed back to an owner who had it before: `handoff-<n>`.
HANDOFF_COPY = "handoff-"
CLAIM_CHUNK = 500  # row ids per claim statement (SQLite's bound-parameter limit)
# How long `redrive deliveries` waits for re-sent rows that another router process took over.
REDRIVE_WAIT_S = 60.0
# DLQ dedupe markers looked up per round trip at start (failed rows whose entry may be missing).
MARKER_CHUNK = 1000


class _Created(Protocol):
    @property
    def created_at(self) -> datetime: ...


P = TypeVar("P", bound=_Created)
T = TypeVar("T")


@dataclass(frozen=True)
class DigestPlan(Generic[P]):
    """What to do with one digest receiver's pending rows now."""

    singles: tuple[P, ...] = ()  # send now, each on its own
    digests: tuple[tuple[P, ...], ...] = ()  # send now, each group as one message
    waiting: tuple[P, ...] = ()  # keep pending
    due_at: datetime | None = None  # when the waiting rows are due (None: nothing waits)


def plan_digest(
    pending: Sequence[P], *, last_sent: datetime | None, window: timedelta, now: datetime,
    max_alerts: int = MAX_DIGEST_ALERTS,
) -> DigestPlan[P]:
    """The digest decision for one receiver, given its pending rows (oldest first) and when
    it was last sent to. Pure.

    * Within the window of the last send (`now < last_sent + window`): everything waits.
    * The window has passed, and some rows arrived within it (they were held back): all
      pending rows go now, as one digest (as a single message when there is only one;
      several digests of at most `max_alerts` for a large backlog).
    * A quiet period (never sent, or every row arrived after the window ended): the first
      row goes at once on its own; the rest wait one window from now.
    """
    rows = tuple(pending)
    if not rows:
        return DigestPlan()
    if last_sent is not None and now < last_sent + window:
        return DigestPlan(waiting=rows, due_at=last_sent + window)
    held = last_sent is not None and any(row.created_at < last_sent + window for row in rows)
    if not held:
        rest = rows[1:]
        return DigestPlan(singles=rows[:1], waiting=rest, due_at=now + window if rest else None)
    step = max(1, max_alerts)
    groups = [rows[i : i + step] for i in range(0, len(rows), step)]
    return DigestPlan(
        singles=tuple(g[0] for g in groups if len(g) == 1),
        digests=tuple(g for g in groups if len(g) > 1),
    )


@dataclass(frozen=True)
class PendingDelivery:
    """A pending `deliveries` row, as the pump sees it."""

    row_id: int
    key: str  # receiver key, owner:channel
    recipient: str
    alert: AnyAlert  # a routed alert, or a data-quality alert (never grouped into a digest)
    created_at: datetime
    # Finished before (dead-lettered, then redriven): re-sent on its own, never in a digest.
    redriven: bool = False


def receiver_key(owner_id: str, channel: str) -> str:
    return f"{owner_id}:{channel}"


def usable_channels(receivers: Mapping[str, object], owner_id: str) -> tuple[str, ...]:
    """The external channels an alert for this owner goes to (configured and usable)."""
    return tuple(c for c in EXTERNAL if receiver_key(owner_id, c) in receivers)


def smtp_settings(settings: Settings) -> SmtpSettings | None:
    """The email channel's server, or None when DECISION_ROUTER_SMTP_HOST is unset. SettingsError (one line
    naming the variable) for what only the channel finds: a password file that cannot be read."""
    if not settings.smtp_host:
        return None
    try:
        return SmtpSettings(
            host=settings.smtp_host,
            port=settings.smtp_port,
            starttls=settings.smtp_starttls,
            use_tls=settings.smtp_use_tls,
            username=settings.smtp_username,
            password=settings.smtp_password,
            password_file=settings.smtp_password_file,
            sender=settings.smtp_sender,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        # Settings checked every field and their combinations; what is left is the file read before them.
        field = str(first["loc"][0]) if first["loc"] else "password_file"
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(f"{ENV_PREFIX}SMTP_{field.upper()}: {message}") from None


def webhook_receiver(owner: Owner, rules_dir: Path) -> WebhookReceiver:
    spec = owner.webhook
    assert spec is not None  # rules check: a webhook channel has a webhook config
    secret: SecretStr | None = None
    if spec.secret_env:
        value = os.environ.get(spec.secret_env)
        if not value:
            raise ValueError(f"owner {owner.id}: webhook secret variable {spec.secret_env} is not set")
        secret = SecretStr(value)
    return WebhookReceiver(
        url=spec.url,
        format=spec.format,
        secret=secret,
        secret_file=(rules_dir / spec.secret_file) if spec.secret_file else None,
        timeout_s=spec.timeout_s,
        max_attempts=spec.max_attempts,
    )


def _reason(exc: ValueError | ValidationError) -> str:
    """What is wrong, without pydantic's `input_value=...`: the receiver's input holds the webhook
    URL, which is itself a credential (a Slack or Teams token sits in its path)."""
    return validation_problems(exc) if isinstance(exc, ValidationError) else str(exc)


def build_receivers(
    ruleset: RuleSet, smtp: SmtpSettings | None
) -> tuple[dict[str, WebhookReceiver | EmailReceiver], list[str]]:
    """Receivers per `owner:channel`, and a warning per channel that cannot be used."""
    receivers: dict[str, WebhookReceiver | EmailReceiver] = {}
    warnings: list[str] = []
    for owner in ruleset.owners.values():
        if "webhook" in owner.channels:
            try:
                receivers[receiver_key(owner.id, "webhook")] = webhook_receiver(owner, ruleset.source_dir)
            except (ValueError, ValidationError) as exc:
                warnings.append(f"webhook of {owner.id} disabled: {_reason(exc)}")
        if "email" in owner.channels and owner.email:
            if smtp is None:
                continue
            receivers[receiver_key(owner.id, "email")] = EmailReceiver(to=[owner.email])
    if smtp is None and any("email" in o.channels for o in ruleset.owners.values()):
        warnings.append("owners use the email channel but DECISION_ROUTER_SMTP_HOST is unset: email is not sent")
    return receivers, warnings


class ChannelDelivery:
    """Owns the dispatcher of one worker and moves `deliveries` rows through it."""

    def __init__(
        self,
        *,
        settings: Settings,
        ruleset: RuleSet,
        engine: Engine,
        redis,
        clock,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.settings, self.engine, self.redis, self.clock = settings, engine, redis, clock
        self.keys = Keys(settings.stream_prefix)
        # This process's name on the rows it claims (see DeliveryClaim): unique per instance, so a
        # restart under the same consumer name does not take over the claims of the one killed.
        self.holder = f"{settings.consumer_name}-{uuid.uuid4().hex[:12]}"
        self._claimed_any = False  # whether this process ever held a claim (else closing releases nothing)
        # The `channel disabled` warnings of the current owner directory: a rules reload logs only
        # new ones, not again each one still true (SMTP unset was repeated on every reload).
        self._warnings: frozenset[str] = frozenset()
        self.receivers, self.digests = self._configure(ruleset)
        self.dispatcher = dispatcher or self._dispatcher(ruleset)
        self._inflight: dict[tuple[str, str, int, int], int] = {}  # _token(receiver, alert) -> row id
        # Rows finished since the current pump began: its snapshot of pending rows may be
        # older than their result, and they must not be sent twice.
        self._done: set[int] = set()
        self._lock = asyncio.Lock()
        # When each digest receiver was last sent a message by this process (the store's finished_at
        # covers sends before a restart): sends finished, or started (they may have reached it).
        self._last_sent: dict[str, datetime] = {}
        # Digest receivers' sends planned and handed to the dispatcher, not yet finished: row id ->
        # (receiver, when planned). They count for the window from then, but only one that started can
        # have reached the receiver: a send handed back never started (a reload) is dropped uncounted.
        self._planned: dict[int, tuple[str, datetime]] = {}
        # Dispatchers replaced by a rules reload, finishing what they had in hand.
        self._retiring: set[asyncio.Task[None]] = set()
        # Claims are per process: two of its tasks dead-lettering the same rows would both hold them.
        self._dead_lettering = asyncio.Lock()
        # Whether this process has looked for what a stopped router left behind (first pump): rows of
        # receivers gone while no router ran, and failed rows whose DLQ entry a stop cut short.
        self._left_behind_checked = False
        # DLQ writes in progress: tasks of their own, so that cancelling the dispatcher worker that
        # started one (a stop, a reload) does not cancel the write; close() gives them a grace.
        self._dlq_writes: set[asyncio.Task[None]] = set()

    def _configure(self, ruleset: RuleSet) -> tuple[dict[str, WebhookReceiver | EmailReceiver], dict[str, timedelta]]:
        """Receivers per `owner:channel` from the owner directory (each unusable one warned
        about, once while it stays unusable), and the digest window of each receiver whose owner has one."""
        receivers, warnings = build_receivers(ruleset, smtp_settings(self.settings))
        for warning in warnings:
            if warning not in self._warnings:
                log.warning("channel disabled", reason=warning)
        self._warnings = frozenset(warnings)
        digests = {
            receiver_key(owner.id, channel): owner.digest
            for owner in ruleset.owners.values()
            if owner.digest
            for channel in EXTERNAL
            if receiver_key(owner.id, channel) in receivers
        }
        return receivers, digests

    def _dispatcher(self, ruleset: RuleSet) -> Dispatcher:
        templates = ruleset.source_dir / "templates"
        return Dispatcher.from_config(
            self.receivers,
            smtp=smtp_settings(self.settings),
            renderer=Renderer(templates if templates.is_dir() else None) if self.receivers else None,
            on_result=self._on_result,
        )

    async def reconfigure(self, ruleset: RuleSet) -> bool:
        """A rules reload: rebuild the receivers (webhook URLs and secrets, email addresses,
        digest windows) from the new owner directory; True if they changed.

        Nothing queued is lost: pending rows stay in the outbox and the next pump sends them
        to the new receivers. The old dispatcher finishes only what is in flight (results are
        recorded as usual); what it has queued goes back to being pending at once, and what it
        cannot finish within CLOSE_TIMEOUT_S too, and is sent again (receivers dedupe on the
        delivery header)."""
        receivers, digests = await asyncio.to_thread(self._configure, ruleset)
        if (receivers, digests) == (self.receivers, self.digests):
            return False
        async with self._lock:  # between pumps
            retired = self.dispatcher
            self.receivers, self.digests = receivers, digests
            self.dispatcher = self._dispatcher(ruleset)
        task = asyncio.create_task(self._retire(retired), name="channels-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("channel receivers rebuilt", receivers=sorted(receivers), digests=sorted(digests))
        return True

    async def _retire(self, dispatcher: Dispatcher) -> None:
        # A queued delivery is handed back at once, for the new receivers (a moved webhook's new URL; a
        # removed one's dead-letter), never sent to the old address, and without waiting for those in flight.
        await self._hand_back(dispatcher.unqueue(), started=False)
        # Only what is in flight finishes there; what does not within CLOSE_TIMEOUT_S may have reached it.
        await self._hand_back(await dispatcher.close(timeout=CLOSE_TIMEOUT_S, finish_queued=False), started=True)
        await self._dead_letter_removed([key for key in dispatcher.receivers if key not in self.receivers])

    async def _hand_back(self, deliveries: Sequence[tuple[str, AnyAlert]], *, started: bool) -> None:
        """Deliveries a dispatcher gave back unreported: their rows are still pending, released for the
        next pump to hand over again. One never `started` reached no receiver: no send for its window."""
        row_ids = [row_id for key, alert in deliveries
                   if (row_id := self._inflight.pop(_token(key, alert), None)) is not None]
        for row_id in row_ids:
            self._settle(row_id, sent=started)
        await asyncio.to_thread(self._release, row_ids)

    def _settle(self, row_id: int, *, sent: bool) -> None:
        """A planned digest-receiver send is over: finished, or given up after it started (it counts for
        the receiver's window from when it was planned), or handed back never started (it does not)."""
        key, at = self._planned.pop(row_id, (None, None))
        if key is not None and at is not None and sent:
            self._last_sent[key] = max(at, self._last_sent.get(key, at))

    async def _dead_letter_removed(self, keys: Sequence[str]) -> None:
        """Rows still pending for receivers the reload removed: no pump would ever send them (it reads
        configured receivers only), so each is dead-lettered, counted and audited, for a redrive once
        the receiver is back."""
        if not keys:
            return
        async with self._dead_lettering:
            await self._dead_letter_unsendable(await asyncio.to_thread(self._pending_of, keys))

    async def _dead_letter_left_behind(self) -> None:
        """At the first pump: DLQ entries a stop cut short are written (`_write_lost_dead_letters`), and rows
        left pending for receivers this process's owner directory does not have (removed, or made unusable,
        while no router ran, so no reload saw them go) are dead-lettered as a reload would have done. Once
        per process, once it succeeded."""
        async with self._dead_lettering:
            if not self._left_behind_checked:
                await self._write_lost_dead_letters()
                await self._dead_letter_unsendable(await asyncio.to_thread(self._pending_unconfigured))
                self._left_behind_checked = True

    async def _write_lost_dead_letters(self) -> None:
        """Failed rows without their deliveries:dlq entry get it, as `_finish` would have written it.

        A row is `failed` in the store before its entry is written; a stop (or a kill) while Redis is
        down in between leaves the row without one, and nothing but the entry lets a redrive find it.
        The entry's dedupe marker tells: a row whose marker is missing never had its entry written (a
        redrive takes the entry, never the marker, and sets the row pending). The write goes through
        the same dedupe key, so processes starting together, or a process still finishing the row,
        write it once. Only rows finished within DECISION_ROUTER_DEDUPE_TTL can be told: an older
        row's marker may have expired with its entry written, so its entry is assumed written."""
        since = self.clock() - self.settings.dedupe_ttl
        failed = await asyncio.to_thread(self._failed_since, since)
        present = await self._through_redis_outage(lambda: self._markers_present(failed), "deliveries:dlq check")
        lost = [row_id for (row_id, _), marked in zip(failed, present, strict=True) if not marked]
        if not lost:
            return
        await self._dead_letter(await asyncio.to_thread(self._lost_dead_letters, lost))
        log.warning("deliveries:dlq entries cut short by a stop written", deliveries=len(lost))

    def _failed_since(self, since: datetime) -> list[tuple[int, int]]:
        """(row id, attempts) of the rows that failed since then: their DLQ marker's name."""
        with Session(self.engine) as session:
            return [(row_id, attempts) for row_id, attempts in session.execute(
                select(DeliveryRecord.id, DeliveryRecord.attempts)
                .where(DeliveryRecord.status == "failed", DeliveryRecord.finished_at >= since)
                .order_by(DeliveryRecord.id)
            )]

    async def _markers_present(self, rows: Sequence[tuple[int, int]]) -> list[bool]:
        """Whether each row's DLQ dedupe marker is set: EXISTS pipelined, a chunk per round trip (one key
        per command, so Redis Cluster routes each on its own)."""
        present: list[bool] = []
        for start in range(0, len(rows), MARKER_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for row_id, attempts in rows[start : start + MARKER_CHUNK]:
                    pipe.exists(self._dlq_marker(row_id, attempts))
                present += [bool(n) for n in await pipe.execute()]
        return present

    def _lost_dead_letters(self, row_ids: Sequence[int]) -> list[StreamWrite]:
        """The DLQ entries of failed rows, field for field as `_finish` writes them. A digest's count is not
        in the row: it is in the row's `delivery_failed` audit event (same transaction, same time)."""
        with Session(self.engine) as session:
            rows = list(session.scalars(select(DeliveryRecord).where(DeliveryRecord.id.in_(list(row_ids)))
                                        .order_by(DeliveryRecord.id)))
            events = session.scalars(select(AuditEvent).where(
                AuditEvent.type == "delivery_failed", AuditEvent.alert_id.in_(sorted({row.alert_id for row in rows}))
            ))
            digests = {(e.alert_id, e.detail.get("owner"), e.detail.get("channel"), e.detail.get("attempts"),
                        as_utc(e.at)): int(e.detail.get("digest") or 0) for e in events}
            return [
                self._dlq_entry(
                    row.row_id, row.key, row.alert, error=record.error, status_code=record.status_code,
                    tries=record.attempts, digest=digests.get(
                        (record.alert_id, record.recipient, record.channel, record.attempts,
                         as_utc(record.finished_at)), 0),
                )
                for record, row in ((record, _pending_delivery(record)) for record in rows)
            ]

    async def _dead_letter_unsendable(self, rows: Sequence[PendingDelivery]) -> None:
        """Dead-letter the rows this process claims (the caller holds `_dead_lettering`)."""
        claimed = await asyncio.to_thread(self._claim, [row.row_id for row in rows]) if rows else set()
        for row in rows:
            if row.row_id in claimed and row.key not in self.receivers:  # not added back meanwhile
                await self._finish(row.row_id, row.key, row.alert, ok=False, error=RECEIVER_REMOVED, status_code=None,
                                   latency_ms=0.0, attempts=())
            elif row.row_id in claimed:
                await asyncio.to_thread(self._release, [row.row_id])

    def _pending_of(self, keys: Sequence[str]) -> list[PendingDelivery]:
        wanted = [DeliveryRecord.recipient == key.rsplit(":", 1)[0] for key in keys]
        with Session(self.engine) as session:
            rows = session.scalars(select(DeliveryRecord).where(DeliveryRecord.status == "pending", or_(*wanted)))
            return [_pending_delivery(row) for row in rows if receiver_key(row.recipient, row.channel) in keys]

    def _pending_unconfigured(self) -> list[PendingDelivery]:
        pending = select(DeliveryRecord).where(DeliveryRecord.status == "pending")
        if self.receivers:
            pending = pending.where(~self._configured())
        with Session(self.engine) as session:
            return [_pending_delivery(row) for row in session.scalars(pending.order_by(DeliveryRecord.id))]

    def channels_for(self, owner_id: str) -> tuple[str, ...]:
        return usable_channels(self.receivers, owner_id)

    async def pump(self) -> int:
        """Hand pending rows to the dispatcher; returns how many rows were submitted.

        Rows for a receiver with a digest window are grouped by `plan_digest`: they may
        wait (stay pending) until the window since the receiver's last send has passed."""
        if not self._left_behind_checked:
            await self._dead_letter_left_behind()
        if not self.receivers:
            return 0
        async with self._lock:
            self._done.clear()
            now = self.clock()
            rows, stored_last = await asyncio.to_thread(self._pending)
            singles: list[PendingDelivery] = []
            digests: list[tuple[str, tuple[PendingDelivery, ...]]] = []
            grouped: dict[str, list[PendingDelivery]] = {}
            for row in rows:
                if _token(row.key, row.alert) in self._inflight or row.row_id in self._done:
                    continue
                if row.key in self.digests and not row.redriven and isinstance(row.alert, Alert):
                    grouped.setdefault(row.key, []).append(row)
                else:
                    singles.append(row)
            in_hand: dict[str, datetime] = {}  # the latest send planned per receiver, not finished
            for key, at in self._planned.values():
                in_hand[key] = max(at, in_hand.get(key, at))
            planned: list[PendingDelivery] = []
            for key, group in grouped.items():
                last = max((t for t in (stored_last.get(key), self._last_sent.get(key), in_hand.get(key))
                            if t is not None), default=None)
                plan = plan_digest(group, last_sent=last, window=self.digests[key], now=now)
                singles += plan.singles
                digests += [(key, digest) for digest in plan.digests]
                planned += [*plan.singles, *(row for digest in plan.digests for row in digest)]
            wanted = [row.row_id for row in singles] + [row.row_id for _, digest in digests for row in digest]
            claimed = await asyncio.to_thread(self._claim, wanted) if wanted else set()
            for row in planned:
                self._planned[row.row_id] = (row.key, now)
                if row.row_id not in claimed:
                    self._settle(row.row_id, sent=True)  # another process is sending it
            return await self._submit_claimed(singles, digests, claimed)

    async def _submit_claimed(
        self, singles: Sequence[PendingDelivery], digests: Sequence[tuple[str, Sequence[PendingDelivery]]],
        claimed: set[int],
    ) -> int:
        """Hand over the rows this process claimed; the others are being sent by another process."""
        submitted = 0
        for row in singles:
            if row.row_id in claimed:
                submitted += await self._submit(row)
        for key, digest in digests:
            mine = [row for row in digest if row.row_id in claimed]
            if len(mine) > 1:
                submitted += await self._submit_digest(key, mine)
            elif mine:
                submitted += await self._submit(mine[0])
        return submitted

    async def _submit(self, row: PendingDelivery) -> int:
        token = _token(row.key, row.alert)
        self._inflight[token] = row.row_id
        if await self.dispatcher.submit(row.key, row.alert):
            return 1
        del self._inflight[token]
        await self._finish(row.row_id, row.key, row.alert, ok=False, error=QUEUE_FULL, status_code=None,
                           latency_ms=0.0, attempts=())
        return 0

    async def _submit_digest(self, key: str, rows: Sequence[PendingDelivery]) -> int:
        tokens = [_token(key, row.alert) for row in rows]
        for token, row in zip(tokens, rows, strict=True):
            self._inflight[token] = row.row_id
        window_s = self.digests[key].total_seconds()
        alerts = [row.alert for row in rows if isinstance(row.alert, Alert)]
        assert len(alerts) == len(rows), "a digest holds routed alerts only"
        if await self.dispatcher.submit_digest(key, alerts, recipient=rows[0].recipient, window_s=window_s):
            return len(rows)
        for token, row in zip(tokens, rows, strict=True):
            del self._inflight[token]
            await self._finish(row.row_id, key, row.alert, ok=False, error=QUEUE_FULL, status_code=None,
                               latency_ms=0.0, attempts=(), digest=len(rows))
        return 0

    def _pending(self) -> tuple[list[PendingDelivery], dict[str, datetime]]:
        """Pending rows of configured receivers (oldest first) that no process is sending, and for
        each digest receiver among them when it was last sent to (its latest finished row).

        Rows being sent (claimed) and rows of receivers no longer configured are left out in the
        query: a slow receiver's backlog in flight must not fill the batch and hold up the others."""
        digest_owners = sorted({key.rsplit(":", 1)[0] for key in self.digests})
        being_sent = exists().where(DeliveryClaim.delivery_id == DeliveryRecord.id,
                                    DeliveryClaim.until >= self._store_time())
        pending = (
            select(DeliveryRecord)
            .where(DeliveryRecord.status == "pending", self._configured(), ~being_sent)
            .order_by(DeliveryRecord.id)
        )
        if self._inflight:  # first: a row this process is still sending stays its own (none: no write)
            self._renew()
        with Session(self.engine) as session:
            if digest_owners:
                rows = list(session.scalars(pending.where(DeliveryRecord.recipient.not_in(digest_owners)).limit(PENDING_BATCH)))
                rows += session.scalars(pending.where(DeliveryRecord.recipient.in_(digest_owners)).limit(DIGEST_PENDING_BATCH))
            else:
                rows = list(session.scalars(pending.limit(PENDING_BATCH)))
            out = [_pending_delivery(row) for row in rows if receiver_key(row.recipient, row.channel) in self.receivers]
            waiting = sorted({row.recipient for row in out if row.key in self.digests})
            last: dict[str, datetime] = {}
            if waiting:
                latest = session.execute(
                    select(DeliveryRecord.recipient, DeliveryRecord.channel, func.max(DeliveryRecord.finished_at))
                    .where(
                        DeliveryRecord.recipient.in_(waiting),
                        DeliveryRecord.status.in_(("delivered", "failed")),
                        DeliveryRecord.finished_at.is_not(None),
                    )
                    .group_by(DeliveryRecord.recipient, DeliveryRecord.channel)
                )
                for recipient, channel, at in latest:
                    if at is not None:
                        last[receiver_key(recipient, channel)] = as_utc(at)
            return out, last

    def _configured(self):
        """A `deliveries` filter: rows of the receivers this process has."""
        owners: dict[str, list[str]] = {}
        for key in self.receivers:
            owner, channel = key.rsplit(":", 1)
            owners.setdefault(channel, []).append(owner)
        return or_(*(and_(DeliveryRecord.channel == channel, DeliveryRecord.recipient.in_(sorted(ids)))
                     for channel, ids in owners.items()))

    def _store_time(self, after: timedelta = timedelta(0)) -> ColumnElement[datetime]:
        """The time `after` from now on the clock claims are judged by, as SQL. On PostgreSQL the database's:
        processes on several hosts share the store, and one whose clock runs ahead by more than CLAIM_LEASE
        would take another's live claims for lapsed (and send their rows again). On SQLite (one host, one
        clock) this process's, in the format SQLAlchemy stores datetimes in (not CURRENT_TIMESTAMP's)."""
        if self.engine.dialect.name == "postgresql":
            return func.now() + after if after else func.now()
        return literal(self.clock() + after, DateTime(timezone=True))

    def _claim(self, row_ids: Sequence[int]) -> set[int]:
        """Claim rows for this process to send; the ids it holds that are still pending. A claim
        that lapsed (its process was killed) is taken over; a row another process claimed, or
        finished since it was read, is not this process's to send."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        claimed: set[int] = set()
        with Session(self.engine) as session:
            for start in range(0, len(row_ids), CLAIM_CHUNK):
                ids = list(row_ids[start : start + CLAIM_CHUNK])
                lapsed = delete(DeliveryClaim).where(DeliveryClaim.delivery_id.in_(ids),
                                                     DeliveryClaim.until < self._store_time())
                session.execute(lapsed)
                until = self._store_time(CLAIM_LEASE)
                session.execute(dialect.insert(DeliveryClaim).values(
                    [{"delivery_id": i, "holder": self.holder, "until": until} for i in ids]
                ).on_conflict_do_nothing())
                session.commit()
                held = set(session.scalars(
                    select(DeliveryClaim.delivery_id)
                    .join(DeliveryRecord, DeliveryRecord.id == DeliveryClaim.delivery_id)
                    .where(DeliveryClaim.delivery_id.in_(ids), DeliveryClaim.holder == self.holder,
                           DeliveryRecord.status == "pending")
                ))
                session.execute(self._own_claims(set(ids) - held))
                session.commit()
                claimed |= held
                self._claimed_any = self._claimed_any or bool(held)
        return claimed

    def _own_claims(self, row_ids: Collection[int]):
        return delete(DeliveryClaim).where(DeliveryClaim.delivery_id.in_(list(row_ids)),
                                           DeliveryClaim.holder == self.holder)

    def _release(self, row_ids: Collection[int] | None = None) -> None:
        """Give up claims (all of this process's with None): those rows are for any process to send.
        Nothing to write when there are none (an empty list, or a process that never claimed a row)."""
        if (row_ids is not None and not row_ids) or not self._claimed_any:
            return
        statement = (delete(DeliveryClaim).where(DeliveryClaim.holder == self.holder) if row_ids is None
                     else self._own_claims(row_ids))
        with Session(self.engine) as session:
            session.execute(statement)
            session.commit()

    def _renew(self) -> None:
        with Session(self.engine) as session:
            session.execute(update(DeliveryClaim).where(DeliveryClaim.holder == self.holder)
                            .values(until=self._store_time(CLAIM_LEASE)))
            session.commit()

    async def _on_result(self, alert: AnyAlert, result: DeliveryResult, attempts: Sequence[Attempt]) -> None:
        # Called once per alert; for a digest, once for each of its alerts with the same result.
        token = _token(result.receiver, alert)
        row_id = self._inflight.get(token)
        if row_id is None:
            return
        try:
            await self._finish(
                row_id, result.receiver, alert, ok=result.ok, error=result.error, status_code=result.status_code,
                latency_ms=result.latency_ms, attempts=attempts, digest=result.digest,
                digest_id=result.alert_id if result.digest else None,
            )
            self._done.add(row_id)
        finally:
            # Only now, with the result stored: a pump reading pending rows meanwhile skips it.
            self._inflight.pop(token, None)

    async def _finish(
        self, row_id: int, key: str, alert: AnyAlert, *, ok: bool, error: str | None, status_code: int | None,
        latency_ms: float, attempts: Sequence[Attempt], digest: int = 0, digest_id: str | None = None,
    ) -> None:
        tries = await asyncio.to_thread(
            self._record, row_id, ok, error, status_code, latency_ms, attempts, digest, digest_id
        )
        self._settle(row_id, sent=True)
        if ok:
            return
        metrics.delivery_failed(key.rsplit(":", 1)[1])
        await self._dead_letter([self._dlq_entry(row_id, key, alert, error=error, status_code=status_code,
                                                 tries=tries, digest=digest)])
        log.warning("delivery failed", receiver=key, alert_id=alert.alert_id, error=error, attempts=tries)

    def _dlq_entry(
        self, row_id: int, key: str, alert: AnyAlert, *, error: str | None, status_code: int | None, tries: int,
        digest: int = 0,
    ) -> StreamWrite:
        """A failed row's deliveries:dlq entry (`tries`: the row's attempts, with this failure's)."""
        owner, channel = key.rsplit(":", 1)
        return StreamWrite(
            stream=self.keys.deliveries_dlq,
            fields={
                "delivery_id": str(row_id),
                "alert_id": alert.alert_id,
                "receiver": key,
                "owner": owner,
                "channel": channel,
                "error": error or "",
                "status_code": "" if status_code is None else str(status_code),
                "attempts": str(tries),
                "payload": alert.model_dump_json(),
                # A digest's rows are dead-lettered one by one; redrive re-sends each on its own.
                **({"digest": str(digest)} if digest else {}),
            },
            dedupe_key=self._dlq_marker(row_id, tries),
        )

    def _dlq_marker(self, row_id: int, tries: int) -> str:
        """The dedupe key of a row's DLQ entry: once per failure (a redriven row fails with more attempts)."""
        return self.keys.dedupe(f"deliverydlq:{row_id}:{tries}")

    async def _dead_letter(self, writes: list[StreamWrite]) -> None:
        """The DLQ write, retried through a Redis outage: the row is already `failed` in the store, and
        this entry is the only way a redrive finds it (the dedupe key makes a retry write it once).
        A task of its own: a stop or reload cancelling the caller (a dispatcher worker) leaves it
        running, for close() to wait for."""
        task = asyncio.create_task(self._through_redis_outage(
            lambda: xadd_once(self.redis, writes, ttl=self.settings.dedupe_ttl, wait=self.settings.replica_wait),
            "deliveries:dlq write"),
            name="deliveries-dlq")
        self._dlq_writes.add(task)
        task.add_done_callback(self._dlq_writes.discard)
        await asyncio.shield(task)

    async def _through_redis_outage(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """`call()`, made again (with backoff) while Redis is unreachable."""
        from decision_router.consumer import infrastructure_failure  # the consumer imports this module

        delay = 0.2
        while True:
            try:
                return await call()
            except Exception as exc:
                if infrastructure_failure(exc) != "Redis":
                    raise
                log.warning(f"{what} failed; retrying", error=str(exc)[:200], retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_backoff_max.total_seconds())

    def _record(
        self, row_id: int, ok: bool, error: str | None, status_code: int | None, latency_ms: float,
        attempts: Sequence[Attempt], digest: int = 0, digest_id: str | None = None,
    ) -> int:
        now: datetime = self.clock()
        with Session(self.engine) as session:
            row = session.get(DeliveryRecord, row_id)
            assert row is not None
            for attempt in attempts:
                session.add(
                    DeliveryAttemptRecord(
                        delivery_id=row_id, n=row.attempts + attempt.n, ok=attempt.ok, status_code=attempt.status_code,
                        error=attempt.error, latency_ms=attempt.latency_ms, at=attempt.at,
                    )
                )
            row.attempts += len(attempts)
            row.status = "delivered" if ok else "failed"
            session.execute(self._own_claims([row_id]))  # with its result: no process sends it again
            row.status_code, row.error, row.latency_ms, row.finished_at = status_code, error, latency_ms, now
            session.add(row)
            session.add(
                AuditEvent(
                    alert_id=row.alert_id,
                    type="delivered" if ok else "delivery_failed",
                    actor=SYSTEM_ACTOR,
                    at=now,
                    detail={
                        "channel": row.channel,
                        "owner": row.recipient,
                        "status_code": status_code,
                        "attempts": row.attempts,
                        "latency_ms": round(latency_ms, 1),
                        **({} if ok else {"error": error}),
                        **({"escalation_level": row.payload["escalation"]["level"]} if row.payload.get("escalation") else {}),
                        **({"digest": digest} if digest else {}),
                        **({"digest_id": digest_id} if digest_id else {}),
                    },
                )
            )
            session.commit()
            return row.attempts

    async def drain(self) -> None:
        await self.pump()
        draining = asyncio.ensure_future(self.dispatcher.drain())
        while not draining.done():  # a long drain (a redrive to a slow receiver) keeps its claims
            await asyncio.wait({draining}, timeout=CLAIM_RENEW_S)
            if not draining.done():
                await asyncio.to_thread(self._renew)

    async def close(self) -> None:
        await asyncio.gather(self.dispatcher.close(timeout=CLOSE_TIMEOUT_S), *self._retiring)
        await self._finish_dead_letters()
        # What did not finish stays pending: released, another process or the next start sends it.
        await asyncio.to_thread(self._release)

    async def _finish_dead_letters(self) -> None:
        """DLQ writes still retrying through a Redis outage get CLOSE_TIMEOUT_S more; what is left then is
        given up: its rows are `failed` without their entry, which the next start writes."""
        if not self._dlq_writes:
            return
        _, unfinished = await asyncio.wait(set(self._dlq_writes), timeout=CLOSE_TIMEOUT_S)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished:
            log.warning("deliveries:dlq writes left for the next start", writes=len(unfinished))


def _pending_delivery(row: DeliveryRecord) -> PendingDelivery:
    assert row.id is not None
    alert = alert_from_payload(row.payload)
    # The hand-off is not in the alert JSON (the payload); the row's key, which it made unique, names it.
    copy = row.delivery_key.rsplit(":", 1)[1]
    if isinstance(alert, Alert) and copy.startswith(HANDOFF_COPY):
        alert = alert.handed_off(int(copy.removeprefix(HANDOFF_COPY)))
    return PendingDelivery(
        row_id=row.id, key=receiver_key(row.recipient, row.channel), recipient=row.recipient,
        alert=alert, created_at=as_utc(row.created_at), redriven=row.finished_at is not None,
    )


def _level(alert: AnyAlert) -> int:
    """The copy: 0 for an alert to its owner (and every data-quality alert), else its escalation level."""
    return 0 if isinstance(alert, DataQualityAlert) or alert.escalation is None else alert.escalation.level


def _handoff(alert: AnyAlert) -> int:
    return alert.handoff if isinstance(alert, Alert) else 1


def _token(key: str, alert: AnyAlert) -> tuple[str, str, int, int]:
    """An in-flight delivery: receiver, alert and copy (escalation level, and hand-off to the owner)."""
    return (key, alert.alert_id, _level(alert), _handoff(alert))


def _copy(alert: AnyAlert) -> str:
    """The copy part of a delivery key: the owner's first hand-off, a hand-back to them, or an escalated copy."""
    if _level(alert):
        return f"escalation-{_level(alert)}"
    return f"{HANDOFF_COPY}{_handoff(alert)}" if _handoff(alert) > 1 else "alert"


def queue_deliveries(
    session: Session, *, alert: AnyAlert, recipient: str, channels: Sequence[str], now: datetime
) -> None:
    """Outbox rows for an alert (or escalated copy, or data-quality alert) to the
    recipient's external channels; once per copy (a hand-back to an owner is a copy of its own)."""
    copy = _copy(alert)
    for channel in channels:
        key = f"{alert.alert_id}:{recipient}:{channel}:{copy}"
        if session.scalar(select(DeliveryRecord.id).where(DeliveryRecord.delivery_key == key)) is not None:
            continue
        session.add(
            DeliveryRecord(
                delivery_key=key,
                alert_id=alert.alert_id,
                recipient=recipient,
                channel=channel,
                payload=alert.model_dump(mode="json"),
                created_at=now,
            )
        )


def redrive_candidates(entries: Sequence[tuple[str, Mapping[str, str]]]) -> list[tuple[str, int]]:
    """(DLQ entry id, delivery id) for each well-formed deliveries:dlq entry."""
    out = []
    for entry_id, fields in entries:
        try:
            out.append((entry_id, int(fields["delivery_id"])))
        except (KeyError, ValueError):
            log.warning("deliveries:dlq entry without a delivery id left in place", entry_id=entry_id)
    return out


@dataclass(frozen=True)
class Redriven:
    sent: int  # deliveries re-sent, their DLQ entries removed
    delivered: int  # of which delivered this time; the others are dead-lettered again (or still pending)
    # DLQ entries left in place, with why: nothing to re-send is known for them, and deleting
    # them would lose the only record of a failed delivery.
    left: tuple[tuple[str, str], ...] = ()
    # Of the re-sent, still being sent by another router process (a running `serve` took them over)
    # after REDRIVE_WAIT_S: pending in the outbox, not lost.
    pending: int = 0


async def redrive(channels: ChannelDelivery, *, limit: int = 10_000) -> Redriven:
    """Re-send each deliveries:dlq entry once: its row goes back to pending and the entry
    is removed; a delivery that fails again is dead-lettered again. An entry without a delivery
    id, or with one the store does not know, is left where it is and reported."""
    stream = channels.keys.deliveries_dlq
    entries = [
        (as_text(entry_id), {as_text(k): as_text(v) for k, v in fields.items()})
        for entry_id, fields in await channels.redis.xrange(stream, count=limit)
    ]
    delivery_of = dict(redrive_candidates(entries))
    rows = await asyncio.to_thread(_dead_lettered, channels.engine, list(delivery_of.values()), channels.receivers)
    known = {row_id for row_id, (state, _) in rows.items() if state == _FAILED}
    left = []
    for entry_id, _ in entries:
        if entry_id not in delivery_of:
            left.append((entry_id, "no delivery id"))
        elif (row := rows.get(delivery_of[entry_id])) is None:
            left.append((entry_id, f"no delivery {delivery_of[entry_id]} in the store"))
            log.warning("deliveries:dlq entry for an unknown delivery left in place", entry_id=entry_id)
        elif row[0] == _UNCONFIGURED:
            # Pending again it would wait for a receiver that does not exist: kept until there is one.
            left.append((entry_id, f"no receiver {row[1]} in owners.yaml"))
    # An entry of a row no longer failed (another redrive re-sent it) is removed, its row left alone.
    taken = [entry_id for entry_id, row_id in delivery_of.items() if rows.get(row_id, ("",))[0] in (_FAILED, _STALE)]
    if taken:
        # The markers go first: a failure of the re-sent row that makes no new attempt (queue full) has the
        # same marker name, which would make its new entry a duplicate to skip. A kill after them leaves the
        # entries (written again at the next start, so at worst twice); a kill before the rows are pending
        # leaves rows failed without entry or marker, which the next start dead-letters again.
        markers = [channels._dlq_marker(row_id, rows[row_id][1]) for row_id in known]
        if markers:
            await channels.redis.delete(*markers)
        await channels.redis.xdel(stream, *taken)
    await asyncio.to_thread(_reset_to_pending, channels.engine, known)
    await channels.drain()
    pending = await _wait_finished(channels.engine, known)
    delivered = await asyncio.to_thread(_count_delivered, channels.engine, known)
    return Redriven(sent=len(known), delivered=delivered, left=tuple(left), pending=pending)


async def _wait_finished(engine: Engine, ids: Collection[int], *, timeout: float = REDRIVE_WAIT_S) -> int:
    """Wait for rows that a running `serve` claimed before this process could (it pumps the same
    outbox); how many are still pending at the end."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (pending := await asyncio.to_thread(_count_pending, engine, ids)) and \
            asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    return pending


def _count_pending(engine: Engine, ids: Collection[int]) -> int:
    with Session(engine) as session:
        return len(session.scalars(select(DeliveryRecord.id).where(
            DeliveryRecord.id.in_(list(ids)), DeliveryRecord.status == "pending"
        )).all())


# What redrive finds of a dead-lettered row: failed (re-sent; with its attempts, its DLQ marker's name),
# failed for a receiver not configured (kept; with the receiver), or no longer failed (its entry is stale).
_FAILED, _UNCONFIGURED, _STALE = "failed", "unconfigured", "stale"


def _dead_lettered(engine: Engine, ids: Sequence[int], receivers: Collection[str]) -> dict[int, tuple[str, Any]]:
    """Row id -> (_FAILED, attempts) | (_UNCONFIGURED, receiver key) | (_STALE, None), for the rows the store has."""
    found: dict[int, tuple[str, Any]] = {}
    with Session(engine) as session:
        for row in session.scalars(select(DeliveryRecord).where(DeliveryRecord.id.in_(list(ids)))):
            assert row.id is not None
            key = receiver_key(row.recipient, row.channel)
            if row.status != "failed":
                found[row.id] = (_STALE, None)
            elif key not in receivers:
                found[row.id] = (_UNCONFIGURED, key)
            else:
                found[row.id] = (_FAILED, row.attempts)
    return found


def _reset_to_pending(engine: Engine, ids: Collection[int]) -> None:
    """Back to pending, for the dispatcher to send again (rows still failed only)."""
    if not ids:
        return
    with Session(engine) as session:
        for row in session.scalars(select(DeliveryRecord).where(
            DeliveryRecord.id.in_(list(ids)), DeliveryRecord.status == "failed"
        )):
            row.status = "pending"
            session.add(row)
        session.commit()


def _count_delivered(engine: Engine, ids: Collection[int]) -> int:
    with Session(engine) as session:
        return len(session.scalars(select(DeliveryRecord.id).where(
            DeliveryRecord.id.in_(list(ids)), DeliveryRecord.status == "delivered"
        )).all())
