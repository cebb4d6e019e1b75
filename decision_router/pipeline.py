"""One batch at a time: gate -> route -> persist -> deliver. The caller acknowledges after.

Exactly-once effect on at-least-once input: alert ids derive from prediction ids, the
store has unique keys, and every stream write goes through `xadd_once`. Alerts are
committed first and written to inboxes after (the outbox), so a crash or a failed write in
between is repaired by the redelivery or by the outbox drain (outbox.py: at start-up, and every
sweep interval while serving).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from decision_router import cooldowns, metrics, tracker
from decision_router.contracts import Alert, OutcomeEvent, OutcomeType, Prediction, Rejection, RejectionReason
from decision_router.delivery import INBOX, inbox_writes
from decision_router.durations import format_duration
from decision_router.keys import Keys
from decision_router.notify import ChannelDelivery, queue_deliveries
from decision_router.quality import (
    RawEntry,
    bounded_detail,
    check_outcome,
    check_prediction,
    decode_entry,
    original_payload,
)
from decision_router.router import Decision, route, route_without_lookups
from decision_router.rules import RuleSet
from decision_router.settings import Settings
from decision_router.streams import StreamWrite, xadd_once
from decision_router.tables import AlertRecord, as_utc

log = structlog.get_logger("decision_router.pipeline")

Entry = tuple[str | None, RawEntry]  # (stream entry id, fields)
# Passes over one batch when concurrent workers keep storing what it stores (each pass sees more of it).
STORE_ATTEMPTS = 5


class Enricher(Protocol):
    async def lookup(self, predictions: Sequence[Prediction]) -> Mapping[str, dict[str, Any]]: ...
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class BatchResult:
    accepted: int = 0
    redelivered: int = 0
    alerts: int = 0
    recorded: int = 0
    held_out: int = 0
    suppressed: int = 0
    delivered: int = 0
    # Outcome events: the alerts a reassignment left as they were, its receiver holding them already; and those
    # it handed over (closed ones included).
    unchanged: list[str] = field(default_factory=list)
    handed_over: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list, repr=False)  # each with its detail, in order
    # Of `rejected`, the entries rejected for the first time (not a redelivered rejection): what the metrics count.
    newly_rejected: dict[str, int] = field(default_factory=dict)

    def count_new(self, recorded: Sequence[Rejection]) -> None:
        for rejection in recorded:
            self.newly_rejected[rejection.reason.value] = self.newly_rejected.get(rejection.reason.value, 0) + 1

    def reject(self, rejection: Rejection) -> None:
        self.rejected[rejection.reason.value] = self.rejected.get(rejection.reason.value, 0) + 1
        self.rejections.append(rejection)

    def rejected_fields(self) -> dict[str, object]:
        """For a batch's log line: the count always, a number like the other counters (it was
        null when nothing was rejected); the reasons when there are any."""
        if not self.rejected:
            return {"rejected": 0}
        return {"rejected": sum(self.rejected.values()), "rejected_reasons": self.rejected}


def dlq_writes(rejections: Sequence[Rejection], *, stream: str, keys: Keys) -> list[StreamWrite]:
    writes = []
    for r in rejections:
        fields = {
            "reason": r.reason.value,
            "detail": r.detail,
            "model": r.model or "",
            "source_stream": r.source_stream,
            "source_id": r.source_id or "",
            "payload": r.payload,
        }
        # Entries without an id (never from a real stream) are written unconditionally.
        marker = f"dlq:{r.source_stream}:{r.source_id}" if r.source_id else f"dlq:{uuid.uuid4().hex}"
        writes.append(StreamWrite(stream=stream, fields=fields, dedupe_key=keys.dedupe(marker)))
    return writes


def stamped_after_added(checked: Sequence[tuple[str | None, RawEntry, Prediction | Rejection]]) -> list[str]:
    """The entry ids of the predictions stamped after their stream entry was added (its id's milliseconds,
    Redis's clock, plus the id's 1 ms step). Only such a one can have been from the future when first read,
    if the router's clock is not behind Redis's by more than max_clock_skew. An id that is no time counts."""
    stamped = []
    for entry_id, _, item in checked:
        if entry_id is None or not isinstance(item, Prediction):
            continue
        try:
            if item.predicted_at.timestamp() * 1000 > int(entry_id.partition("-")[0]) + 1:
                stamped.append(entry_id)
        except ValueError:
            stamped.append(entry_id)
    return stamped


def _prediction_id(fields: RawEntry) -> str | None:
    """The prediction id an entry names, if it can be read at all (an entry that crashed its worker may be
    anything); the gate judges the rest."""
    try:
        pid = decode_entry(fields).get("prediction_id")
    except Exception:  # noqa: BLE001 - unreadable: it was never stored
        return None
    return pid if isinstance(pid, str) else None


class Pipeline:
    def __init__(
        self, *, settings: Settings, ruleset: RuleSet, engine: Engine, redis: Redis, clock: Clock = utcnow
    ) -> None:
        self.settings = settings
        self.ruleset = ruleset
        self.engine = engine
        self.redis = redis
        self.clock = clock
        self.keys = Keys(settings.stream_prefix)
        # Webhook and email delivery after the inbox (see notify.py); optional.
        self.channels: ChannelDelivery | None = None
        # Looks up extra context per prediction before routing (see enrich.py); optional.
        self.enricher: Enricher | None = None

    # predictions ------------------------------------------------------------------

    async def process_predictions(self, entries: Sequence[Entry]) -> BatchResult:
        started = time.perf_counter()
        now = self.clock()
        ruleset = self.ruleset  # one rule set for the batch, even across a hot reload
        checked = [
            (entry_id, fields, self._check(entry_id, fields, now)) for entry_id, fields in entries
        ]
        stale = self._stale_ids(checked, now)
        # Route first without looked-up context: most predictions never reach a rule that
        # reads it, and only the others need their lookups (a Redis or SQL round trip).
        early = [self._route_early(item, ruleset, now) for _, _, item in checked]
        lookups = await self._lookups(
            [item for (_, _, item), pre in zip(checked, early, strict=True) if pre is not None and pre[1] is None]
        )
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                result, rejections, fresh, redelivered = await asyncio.to_thread(
                    self._store_predictions, checked, early, ruleset, now, lookups, stale
                )
                break
            except (IntegrityError, cooldowns.ClaimLost):
                # Another worker stored one of these prediction ids, or started a cooldown window
                # this batch meant to start, between our reads and commit: the transaction rolled
                # back, and the next pass sees its rows (a duplicate; suppressed by its alert).
                if attempt == STORE_ATTEMPTS:
                    raise
        await xadd_once(
            self.redis,
            dlq_writes(rejections, stream=self.keys.predictions_dlq, keys=self.keys),
            ttl=self.settings.dedupe_ttl,
            wait=self.settings.replica_wait,
        )
        # The alerts just committed go straight to their inboxes; a redelivered entry's
        # alerts are read back from the outbox (they may or may not have been written).
        result.delivered = await self._deliver(fresh) + await self.drain_outbox(prediction_ids=redelivered)
        metrics.observe_batch(
            "predictions", size=len(entries), seconds=time.perf_counter() - started, rejected=result.newly_rejected,
            routed=result.accepted,
            decisions={"alert": result.alerts, "record": result.recorded, "control": result.held_out,
                       "suppressed": result.suppressed},
        )
        log.info(
            "batch routed",
            size=len(entries),
            accepted=result.accepted,
            alerts=result.alerts,
            recorded=result.recorded,
            held_out=result.held_out,
            suppressed=result.suppressed,
            redelivered=result.redelivered,
            **result.rejected_fields(),
        )
        return result

    @staticmethod
    def _cooldown_keys(
        routed: Sequence[tuple[Prediction, Sequence[Decision]]], now: datetime
    ) -> tuple[set[tuple[str, str, str]], dict[str, datetime]]:
        """The (rule, entity) pairs of a batch that a cooldown applies to, and for each such
        rule the instant after which an earlier alert still covers the entity."""
        keys: set[tuple[str, str, str]] = set()
        since: dict[str, datetime] = {}
        for prediction, decisions in routed:
            for decision in decisions:
                if decision.cooldown:
                    keys.add((decision.rule, prediction.entity_type, prediction.entity_id))
                    since[decision.rule] = now - decision.cooldown
        return keys, since

    @staticmethod
    def _route_early(
        item: Prediction | Rejection, ruleset: RuleSet, now: datetime
    ) -> tuple[dict[str, Any], list[Decision] | None] | None:
        """(stored document, decisions or None if they need the lookups); None for a rejection."""
        if isinstance(item, Rejection):
            return None
        document = item.as_document()
        return document, route_without_lookups(document, ruleset, now=now)

    def _check(self, entry_id: str | None, fields: RawEntry, now: datetime) -> Prediction | Rejection:
        return check_prediction(
            fields,
            now=now,
            max_age=self.settings.max_prediction_age,
            max_skew=self.settings.max_clock_skew,
            source_stream=self.keys.predictions,
            source_id=entry_id,
            limits=self.settings.payload_limits,
        )

    def _stale_ids(
        self, checked: Sequence[tuple[str | None, RawEntry, Prediction | Rejection]], now: datetime
    ) -> dict[str, str]:
        """Entry id -> prediction id of the entries rejected as stale. One may have been accepted when it
        was fresh, and be back only because a crash or an outage came before its ack: the store tells."""
        stale: dict[str, str] = {}
        for entry_id, fields, item in checked:
            if entry_id is not None and isinstance(item, Rejection) and item.reason is RejectionReason.STALE:
                ageless = check_prediction(
                    fields, now=now, max_age=timedelta.max, max_skew=self.settings.max_clock_skew,
                    source_stream=self.keys.predictions, source_id=entry_id, limits=self.settings.payload_limits,
                )
                if isinstance(ageless, Prediction):
                    stale[entry_id] = ageless.prediction_id
        return stale

    async def _lookups(self, predictions: Sequence[Prediction]) -> Mapping[str, dict[str, Any]]:
        """Context looked up at routing time (prediction_id -> {source: {field: value}})."""
        if self.enricher is None or not predictions:
            return {}
        return await self.enricher.lookup(predictions)

    def _store_predictions(
        self,
        checked: Sequence[tuple[str | None, RawEntry, Prediction | Rejection]],
        early: Sequence[tuple[dict[str, Any], list[Decision] | None] | None],
        ruleset: RuleSet,
        now: datetime,
        lookups: Mapping[str, dict[str, Any]],
        stale: Mapping[str, str],
    ) -> tuple[BatchResult, list[Rejection], list[Alert], list[str]]:
        """Route and store one batch in one transaction: one query for known prediction ids,
        one for cooldowns, one bulk insert per table. Returns the result, the rejections,
        the alerts to deliver now and the prediction ids redelivered (already stored)."""
        result = BatchResult()
        rejections: list[Rejection] = []
        redelivered: list[str] = []
        with Session(self.engine) as session:
            known = tracker.known_predictions(
                session, [*(p.prediction_id for _, _, p in checked if isinstance(p, Prediction)), *stale.values()]
            )
            # Rejected as from the future when first read, then read again (a crash before the ack, an outage)
            # once valid: it stays rejected. Only a prediction stamped after its entry was added can be one.
            rejected_before = tracker.earlier_rejections(session, self.keys.predictions, stamped_after_added(checked))
            routed: list[tuple[str | None, Prediction, dict[str, Any], list[Decision]]] = []
            for (entry_id, fields, item), pre in zip(checked, early, strict=True):
                if isinstance(item, Rejection) or pre is None:
                    assert isinstance(item, Rejection)
                    stale_pid = stale.get(entry_id) if entry_id is not None else None
                    if stale_pid is not None and known.get(stale_pid) == entry_id:
                        # Accepted while it was fresh: a redelivery, not a rejection (finish its delivery).
                        result.redelivered += 1
                        redelivered.append(stale_pid)
                    else:
                        rejections.append(item)
                    continue
                if rejected_before and entry_id in rejected_before:
                    again = rejected_before[entry_id]
                    rejections.append(again.model_copy(update={"payload": original_payload(fields)}))
                    continue
                pid = item.prediction_id
                if pid in known:
                    if entry_id is not None and known[pid] == entry_id:
                        # The same stream entry again (crash before ack): only finish its delivery.
                        result.redelivered += 1
                        redelivered.append(pid)
                    else:
                        rejections.append(
                            Rejection(
                                reason=RejectionReason.DUPLICATE,
                                # Quotes what was sent: a prediction_id of any length (up to the entry's size).
                                detail=bounded_detail(
                                    f"prediction_id {pid} was already accepted from entry {known[pid] or '?'}"
                                ),
                                model=item.model,
                                source_stream=self.keys.predictions,
                                source_id=entry_id,
                                payload=original_payload(fields),
                            )
                        )
                    continue
                known[pid] = entry_id
                document, decisions = pre
                if decisions is None:
                    # Looked-up context is addressed as lookup.<source>.<field> in rules, and stored
                    # with the prediction so that `rules replay` routes it as it was routed here.
                    if pid in lookups:
                        document = {**document, "lookup": lookups[pid]}
                    decisions = route(document, ruleset, now=now)
                routed.append((entry_id, item, document, decisions))
            keys, since = self._cooldown_keys([(p, d) for _, p, _, d in routed], now)
            stored_cooldowns = cooldowns.holders(session, keys, since=since, now=now)
            cooling: dict[tuple[str, str, str], str] = {}  # cooldowns started in this batch
            predictions: list[dict[str, Any]] = []
            alerts: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []
            fresh: list[Alert] = []
            for entry_id, item, document, decisions in routed:
                suppressed_by: dict[str, str] = {}
                for decision in decisions:
                    key = (decision.rule, item.entity_type, item.entity_id)
                    if decision.cooldown and (active := cooling.get(key) or stored_cooldowns.get(key)):
                        suppressed_by[decision.rule] = active
                prediction_row, alert_rows, event_rows = tracker.decision_rows(
                    prediction=item, document=document, stream_id=entry_id, decisions=decisions,
                    rules_version=ruleset.version, now=now, suppressed_by=suppressed_by,
                )
                predictions.append(prediction_row)
                alerts.extend(alert_rows)
                events.extend(event_rows)
                result.accepted += 1
                for row, decision in zip(alert_rows, decisions, strict=True):
                    if decision.cooldown and not row["suppressed_by"]:
                        cooling[(decision.rule, item.entity_type, item.entity_id)] = row["alert_id"]
                    if row["suppressed_by"]:
                        result.suppressed += 1
                    elif row["held_out"]:
                        result.held_out += 1
                    elif row["action"] == "record":
                        result.recorded += 1
                    else:
                        result.alerts += 1
                        fresh.append(tracker.alert_of(row))
            cooldowns.claim(session, cooling, ruleset=ruleset, now=now)  # first: ClaimLost has written nothing
            # The gate refused every NaN and infinity; looked-up context was not gated.
            tracker.insert_rows(session, predictions, alerts, events, finite=not lookups)
            for rejection in rejections:
                result.reject(rejection)
            result.count_new(tracker.record_rejections(session, rejections, now=now))
            session.commit()
        return result, rejections, fresh, redelivered

    # delivery ---------------------------------------------------------------------

    async def drain_outbox(self, *, prediction_ids: Sequence[str]) -> int:
        """Write the stored, undelivered alerts of these predictions to their owners' inboxes (a redelivered or
        finished batch's, a reassignment's); returns how many. The whole outbox is drained by outbox.py."""
        if not prediction_ids:
            return 0
        return await self._deliver(await asyncio.to_thread(self._undelivered, prediction_ids))

    async def _deliver(self, alerts: list[Alert]) -> int:
        """Inbox writes (deduplicated, one pipelined round trip), then mark them delivered."""
        if not alerts:
            return 0
        await self.write_to_inboxes(alerts)
        await self.pump_channels()
        return len(alerts)

    async def write_to_inboxes(self, alerts: list[Alert]) -> int:
        """Each alert written to its owner's inbox once (its dedupe marker), then marked delivered: a mark that
        holds only while the alert is undelivered and still that owner's, so two writers mark it once. Returns
        how many this call marked."""
        await xadd_once(
            self.redis, inbox_writes(alerts, self.keys), ttl=self.settings.dedupe_ttl, wait=self.settings.replica_wait
        )
        return await asyncio.to_thread(self._mark_delivered, alerts)

    async def pump_channels(self) -> None:
        """Send the webhook and email deliveries the marks queued, if any owner has a channel."""
        if self._external_channels:
            await self.channels.pump()  # type: ignore[union-attr]

    @property
    def _external_channels(self) -> bool:
        """Whether any owner has a usable webhook or email; without, that path is skipped."""
        return self.channels is not None and bool(self.channels.receivers)

    def _undelivered(self, prediction_ids: Sequence[str]) -> list[Alert]:
        with Session(self.engine) as session:
            return self._as_delivered(session, tracker.undelivered_alerts(session, prediction_ids=prediction_ids))

    def undelivered_before(self, before: datetime, *, after: Alert | None, limit: int) -> list[Alert]:
        """The outbox's alerts created before `before`, in order from past `after` (outbox.OutboxDrain's chunks)."""
        with Session(self.engine) as session:
            cursor = (after.created_at, after.alert_id) if after is not None else None
            return self._as_delivered(session, tracker.outbox_alerts(session, before=before, after=cursor, limit=limit))

    @staticmethod
    def _as_delivered(session: Session, records: Sequence[AlertRecord]) -> list[Alert]:
        """The alerts as their owners receive them, each keyed by its hand-off (the inbox write's dedupe marker)."""
        handed_back = tracker.handoffs(session, records)
        return [tracker.to_alert(r).handed_off(handed_back[r.alert_id]) if r.alert_id in handed_back
                else tracker.to_alert(r) for r in records]

    def _mark_delivered(self, alerts: list[Alert]) -> int:
        """Returns how many were marked now (not already, by another worker)."""
        now = self.clock()
        with Session(self.engine) as session:
            newly = set(tracker.mark_delivered(session, {a.alert_id: a.owner for a in alerts}, channel=INBOX, now=now))
            if self._external_channels:
                assert self.channels is not None
                for alert in alerts:
                    if alert.alert_id in newly:
                        channels = self.channels.channels_for(alert.owner)
                        if channels:
                            queue_deliveries(session, alert=alert, recipient=alert.owner, channels=channels, now=now)
            session.commit()
        return len(newly)

    # entries stored before their worker stopped -----------------------------------

    async def finish_stored_predictions(self, entries: Sequence[Entry]) -> list[str]:
        """The ids of `entries` whose effects the store holds already, as `process_predictions` recognises a
        redelivery: the prediction accepted from that very entry, or the entry's rejection. Their undelivered
        alerts reach the inboxes and their DLQ entries are written now (deduplicated); nothing is routed.
        For the consumer, before it dead-letters an entry delivered so often that its worker seems to die on
        it: one that was stored each time, its worker gone before the ack, is no failure. Rare, a few entries."""
        accepted, rejected = await asyncio.to_thread(self._stored_predictions, entries)
        await self._finish(rejected, dlq=self.keys.predictions_dlq, prediction_ids=list(accepted.values()))
        return [*accepted, *(r.source_id for r in rejected if r.source_id is not None)]

    async def finish_stored_outcomes(self, entries: Sequence[Entry]) -> list[str]:
        """As `finish_stored_predictions`, for outcome events: applied from that entry (its audit events
        name it), or rejected. The alerts an applied event reassigned reach their new owners' inboxes."""
        applied, rejected = await asyncio.to_thread(self._stored_outcomes, entries)
        await self._finish(rejected, dlq=self.keys.outcomes_dlq, prediction_ids=[p for ps in applied.values() for p in ps])
        return [*applied, *(r.source_id for r in rejected if r.source_id is not None)]

    async def _finish(self, rejected: Sequence[Rejection], *, dlq: str, prediction_ids: Sequence[str]) -> None:
        await xadd_once(self.redis, dlq_writes(rejected, stream=dlq, keys=self.keys), ttl=self.settings.dedupe_ttl,
                        wait=self.settings.replica_wait)
        await self.drain_outbox(prediction_ids=prediction_ids)

    def _stored_predictions(self, entries: Sequence[Entry]) -> tuple[dict[str, str], list[Rejection]]:
        """(entry id -> prediction id of the entries accepted, the recorded rejections of the others)."""
        wanted = {entry_id: pid for entry_id, fields in entries
                  if entry_id is not None and (pid := _prediction_id(fields)) is not None}
        with Session(self.engine) as session:
            known = tracker.known_predictions(session, wanted.values())
            accepted = {entry_id: pid for entry_id, pid in wanted.items() if known.get(pid) == entry_id}
            rejected = self._recorded_rejections(session, self.keys.predictions, entries, skip=accepted)
        return accepted, rejected

    def _stored_outcomes(self, entries: Sequence[Entry]) -> tuple[dict[str, list[str]], list[Rejection]]:
        """(entry id -> the prediction ids of the alerts it changed, of the entries applied; the recorded
        rejections of the others)."""
        applied: dict[str, list[str]] = {}
        with Session(self.engine) as session:
            for entry_id, _ in entries:
                source_id = f"{self.keys.outcomes}/{entry_id}" if entry_id else None
                if source_id is not None and tracker.already_applied(session, source_id):
                    applied[entry_id] = tracker.applied_to(session, source_id)  # type: ignore[index]
            rejected = self._recorded_rejections(session, self.keys.outcomes, entries, skip=applied)
        return applied, rejected

    @staticmethod
    def _recorded_rejections(
        session: Session, stream: str, entries: Sequence[Entry], *, skip: Mapping[str, object]
    ) -> list[Rejection]:
        """The rejections stored for `entries` (but those in `skip`), with their payloads for the DLQ."""
        ids = [entry_id for entry_id, _ in entries if entry_id is not None and entry_id not in skip]
        recorded = tracker.earlier_rejections(session, stream, ids)
        return [recorded[entry_id].model_copy(update={"payload": original_payload(fields)})
                for entry_id, fields in entries if entry_id in recorded]

    # outcomes ---------------------------------------------------------------------

    async def process_outcomes(self, entries: Sequence[Entry]) -> BatchResult:
        started = time.perf_counter()
        now = self.clock()
        limits = self.settings.payload_limits
        skew = self.settings.max_clock_skew
        parsed = [
            (entry_id, fields, check_outcome(fields, source_stream=self.keys.outcomes, source_id=entry_id,
                                             limits=limits, now=now, max_skew=skew))
            for entry_id, fields in entries
        ]
        try:
            result, rejections, touched = await asyncio.to_thread(self._store_outcomes, parsed, now)
        except IntegrityError:
            # A concurrent worker applied the same entry: the second pass skips it.
            result, rejections, touched = await asyncio.to_thread(self._store_outcomes, parsed, now)
        await xadd_once(
            self.redis,
            dlq_writes(rejections, stream=self.keys.outcomes_dlq, keys=self.keys),
            ttl=self.settings.dedupe_ttl,
            wait=self.settings.replica_wait,
        )
        # Reassigned alerts went back into the outbox for their new owner.
        result.delivered = await self.drain_outbox(prediction_ids=touched)
        metrics.observe_batch(
            "outcomes", size=len(entries), seconds=time.perf_counter() - started, rejected=result.newly_rejected
        )
        log.info(
            "outcomes recorded",
            size=len(entries),
            applied=result.accepted,
            redelivered=result.redelivered,
            **result.rejected_fields(),
        )
        return result

    def _store_outcomes(
        self, parsed: Sequence[tuple[str | None, RawEntry, OutcomeEvent | Rejection]], now: datetime
    ) -> tuple[BatchResult, list[Rejection], list[str]]:
        result = BatchResult()
        rejections: list[Rejection] = []
        reassigned: list[str] = []
        with Session(self.engine) as session:
            # Rejected when first read (its alert not there yet, an owner not yet in the directory), then read
            # again (a crash before the ack, an outage) once it would apply: it stays rejected.
            rejected_before = tracker.earlier_rejections(
                session, self.keys.outcomes,
                [entry_id for entry_id, _, item in parsed if entry_id is not None and not isinstance(item, Rejection)],
            )
            for entry_id, fields, item in parsed:
                if isinstance(item, Rejection):
                    rejections.append(item)
                    continue
                if entry_id in rejected_before:
                    again = rejected_before[entry_id]
                    rejections.append(again.model_copy(update={"payload": original_payload(fields)}))
                    continue
                source_id = f"{self.keys.outcomes}/{entry_id}" if entry_id else None
                if tracker.already_applied(session, source_id):
                    result.redelivered += 1
                    if item.type is OutcomeType.REASSIGNED:
                        # Applied, but the crash or outage that brought it back may have come before its
                        # alerts reached the new owner: drained again below (the inbox write is deduped).
                        reassigned.extend(tracker.applied_to(session, source_id))
                        handed_over, unchanged = tracker.reassigned_by(session, source_id)
                        result.handed_over.extend(handed_over)
                        result.unchanged.extend(unchanged)
                    continue
                found = tracker.find_alerts(session, item, now=now, outcome_window=self.settings.outcome_window,
                                            max_clock_skew=self.settings.max_clock_skew)
                alerts, reason, detail = self._applicable(item, found, now)
                if reason is RejectionReason.UNKNOWN_ALERT and item.alert_id is None and item.prediction_id is None:
                    detail += self._already_closed(session, item, now)
                if reason is not None:
                    rejections.append(
                        Rejection(
                            reason=reason,
                            detail=bounded_detail(detail),
                            source_stream=self.keys.outcomes,
                            source_id=entry_id,
                            payload=original_payload(fields),
                        )
                    )
                    continue
                unchanged = tracker.apply_outcome(
                    session, event=item, alerts=alerts, source_id=source_id, now=now, owners=self.ruleset.owners
                )
                result.accepted += 1
                result.unchanged.extend(unchanged)
                if item.type is OutcomeType.REASSIGNED:
                    result.handed_over.extend(a.alert_id for a in alerts if a.alert_id not in unchanged)
                    # Those it moved go to their new owners: the drain sends those back in the outbox (not a closed one).
                    reassigned.extend(a.prediction_id for a in alerts if a.alert_id not in unchanged)
            for rejection in rejections:
                result.reject(rejection)
            result.count_new(tracker.record_rejections(session, rejections, now=now))
            session.commit()
        return result, rejections, reassigned

    def _applicable(
        self, event: OutcomeEvent, found: Sequence[AlertRecord], now: datetime
    ) -> tuple[Sequence[AlertRecord], RejectionReason | None, str]:
        """The alerts `event` applies to among those it addresses, or why it applies to none.

        An event by entity is about the entity's alerts of its `at`: those created later (beyond the clock skew)
        are left alone, and it is refused only if none was there yet. An event naming its alert or prediction
        (whose alerts are all created together) and dated before it has a wrong clock: refused. An
        acknowledgement or intervention after an alert's outcome leaves that alert alone (by entity it is not
        even found: only open alerts are); refused if it leaves every one alone."""
        reason, detail = self._outcome_problem(event, found)
        if reason is not None:
            return [], reason, detail
        too_early = {alert.alert_id: why for alert in found if (why := self._dated_before(event, alert))}
        by_entity = event.alert_id is None and event.prediction_id is None
        existing = [alert for alert in found if alert.alert_id not in too_early] if by_entity or not too_early else []
        if not existing:
            return [], RejectionReason.SCHEMA, next(iter(too_early.values()))  # the earliest alert's
        too_late = {alert.alert_id: why for alert in existing if (why := self._dated_after_outcome(event, alert, now))}
        applicable = [alert for alert in existing if alert.alert_id not in too_late]
        if not applicable:
            return [], RejectionReason.SCHEMA, next(iter(too_late.values()))
        return applicable, None, ""

    def _outcome_problem(
        self, event: OutcomeEvent, alerts: Sequence[AlertRecord]
    ) -> tuple[RejectionReason | None, str]:
        if not alerts:
            if event.alert_id is not None:
                return RejectionReason.UNKNOWN_ALERT, f"no alert {event.alert_id}"
            if event.prediction_id is not None:
                return RejectionReason.UNKNOWN_ALERT, f"no alert for prediction {event.prediction_id}"
            return (
                RejectionReason.UNKNOWN_ALERT,
                (
                    f"no open alert for {event.entity_type}:{event.entity_id} predicted within the outcome window "
                    f"({format_duration(self.settings.outcome_window)}) before the event"
                ),
            )
        if event.type is OutcomeType.REASSIGNED and event.owner not in self.ruleset.owners:
            return RejectionReason.UNKNOWN_OWNER, f"owner {event.owner!r} is not in the owner directory"
        return None, ""

    def _already_closed(self, session: Session, event: OutcomeEvent, now: datetime) -> str:
        """For an event by entity that found no open decision: whether those in the window are all closed (the
        entity's outcome sent again, or a correction), not unknown to the router."""
        closed = tracker.closed_in_window(session, event, now=now, outcome_window=self.settings.outcome_window,
                                          max_clock_skew=self.settings.max_clock_skew)
        if not closed:
            return ""
        decisions = "decision there already has" if closed == 1 else "decisions there already have"
        return f": its {closed} {decisions} an outcome (the first one wins)"

    def _dated_before(self, event: OutcomeEvent, alert: AlertRecord) -> str | None:
        """Why `event` cannot be about `alert`, or None. Nobody acts on an alert before it exists, nor has an
        outcome before the prediction: such an `at` (a wrong clock, a typo'd year) would make negative times to
        act in the stats."""
        if event.at is None:
            return None
        since, what = (
            (alert.predicted_at, "was predicted") if event.type is OutcomeType.OUTCOME
            else (alert.created_at, "was created")
        )
        if event.at >= as_utc(since) - self.settings.max_clock_skew:
            return None
        return f"at {event.at.isoformat()} is before alert {alert.alert_id} {what} ({as_utc(since).isoformat()})"

    @staticmethod
    def _dated_after_outcome(event: OutcomeEvent, alert: AlertRecord, now: datetime) -> str | None:
        """Why an acknowledgement or intervention cannot be recorded on `alert`, or None: it came after the alert's
        outcome, so it cannot have caused it; recorded, the alert would count as acted on, its time to act
        running past its outcome. One dated before the outcome (reported late) is recorded."""
        if event.type not in (OutcomeType.ACKNOWLEDGED, OutcomeType.INTERVENED) or alert.outcome_at is None:
            return None
        at, outcome_at = event.at or now, as_utc(alert.outcome_at)
        if at <= outcome_at:
            return None
        when = f"at {at.isoformat()}" + ("" if event.at is not None else " (now: the event gives no `at`)")
        return (f"{when} is after alert {alert.alert_id}'s outcome ({outcome_at.isoformat()}): an "
                f"{'acknowledgement' if event.type is OutcomeType.ACKNOWLEDGED else 'intervention'} after the "
                "outcome cannot have caused it")
