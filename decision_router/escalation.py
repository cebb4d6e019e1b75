"""SLA escalation: an alert not acknowledged (or not acted on) by its deadline goes one
step up the owner directory's manager chain, again and again, until someone responds or
the chain ends, which is an SLA breach.

Deadlines live in the alerts table, so an escalation that fell due while the service was
down fires when it comes back, once. Each step is a compare-and-set on `sla_revision`
plus a unique (alert, level) row, so several workers never escalate an alert twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import func, select, union, update
from sqlmodel import Session

from decision_router import metrics
from decision_router.contracts import Alert, Escalation
from decision_router.durations import format_duration
from decision_router.keys import Keys
from decision_router.notify import queue_deliveries
from decision_router.pipeline import Pipeline
from decision_router.router import present_owner
from decision_router.rules import Owner
from decision_router.streams import StreamWrite, xadd_once
from decision_router.tables import (
    DELIVERED_TO_OWNER,
    SLA_DUE_COLUMNS,
    SLA_PENDING,
    AlertRecord,
    AuditEvent,
    EscalationRecord,
    as_utc,
)
from decision_router.tracker import SYSTEM_ACTOR, to_alert

log = structlog.get_logger("decision_router.escalation")


@dataclass
class SweepResult:
    escalated: int = 0
    breached: int = 0
    # of which a deadline breached before (by the chain of an owner the alert was reassigned from): the stats
    # and decision_router_sla_breaches_total count a breach once per alert and deadline
    repeated_breaches: int = 0
    conflicts: int = 0  # another worker changed the alert first
    delivered: int = 0


def due_alerts(session: Session, *, now: datetime, limit: int = 500) -> list[AlertRecord]:
    """Open, delivered-kind alerts with a deadline that has passed unmet: the oldest created first
    (then by id), at most `limit`."""
    # One select per deadline, each served by its partial index (tables.SLA_PENDING): they read only
    # the due entries, where one select with OR walked every alert by creation time on SQLite. Both
    # deadlines missed: in both, once after the UNION.
    due = (
        union(*(
            select(AlertRecord.created_at, AlertRecord.alert_id)
            .where(pending, SLA_DUE_COLUMNS[kind] <= now, DELIVERED_TO_OWNER)
            for kind, pending in SLA_PENDING.items()
        ))
        .order_by("created_at", "alert_id")
        .limit(limit)
        .subquery()
    )
    return list(
        session.scalars(
            select(AlertRecord)
            .join(due, AlertRecord.alert_id == due.c.alert_id)
            .order_by(due.c.created_at, due.c.alert_id)
        )
    )


def _missed(record: AlertRecord, now: datetime) -> tuple[str, timedelta, str, bool] | None:
    """(kind, window, reason, whether the ack deadline is missed too) of the deadline to escalate for, if any."""
    created = as_utc(record.created_at)
    ack_window = as_utc(record.ack_by) - created
    act_window = as_utc(record.act_by) - created
    ack_missed = record.acknowledged_at is None and record.ack_due_at is not None and as_utc(record.ack_due_at) <= now
    act_missed = record.intervened_at is None and record.act_due_at is not None and as_utc(record.act_due_at) <= now
    if act_missed:
        # Both missed (e.g. the service was down): one escalation, for the graver one.
        reason = f"no intervention recorded within {format_duration(act_window)}"
        if ack_missed:
            reason = f"not acknowledged within {format_duration(ack_window)}, and {reason}"
        return "act", act_window, reason, ack_missed
    if ack_missed:
        return "ack", ack_window, f"not acknowledged within {format_duration(ack_window)}", True
    return None


def _chain_so_far(session: Session, record: AlertRecord) -> list[str]:
    """Who held the alert since its chain last started at its owner, the latest first: the manager it
    is escalated to, each one it came from, down to the owner (a reassignment starts a new chain)."""
    if record.escalated_to is None:
        return [record.owner]
    holders = [record.escalated_to]
    steps = session.scalars(
        select(EscalationRecord.from_owner)
        .where(EscalationRecord.alert_id == record.alert_id)
        .order_by(EscalationRecord.level.desc())
    )
    for from_owner in steps:
        holders.append(from_owner)
        if from_owner == record.owner:
            break
    return holders


def _next_manager(
    session: Session, record: AlertRecord, holder: str, owners: Mapping[str, Owner]
) -> tuple[str | None, str | None, list[str]]:
    """(the holder the next step goes up from, their manager or None at the top, the holders skipped
    because they left the directory). A holder that a hot reload removed does not end the chain: the
    step goes up from the latest earlier holder still in the directory, to their manager as of now,
    which is whoever took the removed one's place (or the next one up, if nobody did). With nobody of
    the chain left (its owner removed too), there is no one to go up from: None, None."""
    if holder in owners:
        return holder, owners[holder].manager, []
    gone = []
    for earlier in _chain_so_far(session, record):
        if earlier in owners:
            return earlier, owners[earlier].manager, gone
        gone.append(earlier)
    return None, None, gone


def escalate(session: Session, record: AlertRecord, *, owners: Mapping[str, Owner], now: datetime) -> str | None:
    """One step for one alert: "escalated", "breached", "breached again" (the deadline was breached before, by an
    earlier owner's chain), "conflict", or None if nothing is due."""
    missed = _missed(record, now)
    if missed is None:
        return None
    kind, window, reason, ack_missed = missed
    holder = record.escalated_to or record.owner
    below, manager, gone = _next_manager(session, record, holder, owners)
    if gone:
        # A hot reload removed the holder: the chain goes on as the directory now runs it.
        if below is None:
            where = "nobody of its chain is left"
        else:
            where = f"up from {below}" if manager else f"{below} is the top of the chain now"
        reason = f"{reason} ({', '.join(gone)} no longer in the owner directory; {where})"
    # An away manager's copy goes to their delegate, as a new alert would; the chain goes on from the
    # manager (escalated_to), so the next step is the manager's own manager.
    recipient = present_owner(manager, owners, now) if manager else None
    # A delegate who already holds the alert (alice's manager away, delegating to alice) would get back the
    # alert they missed: no escalation at all. The step goes on up, past that manager, in the same step.
    holding = {record.owner, holder, below}
    skipped: list[tuple[str, str]] = []
    for _ in range(len(owners)):  # manager chains do not loop (load.py); the bound keeps this total even so
        if manager is None or recipient not in holding:
            break
        skipped.append((manager, recipient))  # type: ignore[arg-type]
        manager = owners[manager].manager if manager in owners else None
        recipient = present_owner(manager, owners, now) if manager else None
    if skipped:
        passed = "; ".join(f"{away} is away and their delegate {delegate} already holds it" for away, delegate in skipped)
        where = f"up to {manager}" if manager else f"{skipped[-1][0]} is the top of the chain"
        reason = f"{reason} ({passed}: {where})"
    values: dict[str, object] = {"sla_revision": record.sla_revision + 1}
    if kind == "act" and ack_missed:
        # This one step stands for both misses. An ack deadline still ahead (the ack chain pushed it past the act's)
        # stays pending: clearing it too, its chain would never go on nor breach.
        values["ack_due_at"] = None
    if manager:
        level = record.escalation_level + 1
        values.update({"escalation_level": level, "escalated_to": manager, f"{kind}_due_at": now + window})
    else:
        # The first breach's time stays: a reassigned alert's new chain may breach the same deadline again.
        breached_at = getattr(AlertRecord, f"{kind}_breached_at")
        values.update({f"{kind}_due_at": None, f"{kind}_breached_at": func.coalesce(breached_at, now)})
    changed = session.execute(
        update(AlertRecord)
        .where(AlertRecord.alert_id == record.alert_id, AlertRecord.sla_revision == record.sla_revision)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:
        return "conflict"
    detail = {"kind": kind, "reason": reason, "original_owner": record.owner, "from_owner": holder}
    # A breach of a deadline breached before. As read, and the compare-and-set above held: nothing changed the row since.
    repeat = manager is None and getattr(record, f"{kind}_breached_at") is not None
    if manager:
        assert recipient is not None
        if recipient != manager:
            reason = f"{reason} ({manager} is away; to their delegate)"
            detail.update(reason=reason, delegated_from=manager)
        session.add(
            EscalationRecord(
                alert_id=record.alert_id, level=level, kind=kind, from_owner=holder, to_owner=recipient, reason=reason,
                at=now,
            )
        )
        detail.update(level=level, to_owner=recipient)
    else:
        detail.update(level=record.escalation_level, top_of_chain=skipped[-1][0] if skipped else below or holder)
        if repeat:
            # By a reassigned alert's new chain: the audit story must not read as a second, separate breach.
            detail.update(again=True)
    if gone:
        detail.update(removed_from_directory=gone)
    if skipped:
        detail.update(skipped=[away for away, _ in skipped])
    session.add(
        AuditEvent(
            alert_id=record.alert_id,
            prediction_id=record.prediction_id,
            type="escalated" if manager else "sla_breached",
            actor=SYSTEM_ACTOR,
            at=now,
            source_id=f"sla:{record.alert_id}:{record.sla_revision}",
            detail=detail,
        )
    )
    if manager:
        return "escalated"
    return "breached again" if repeat else "breached"


def escalation_writes(session: Session, keys: Keys, *, limit: int = 500) -> list[tuple[int, StreamWrite, Alert]]:
    """The escalation outbox: copies for managers not yet written to their inboxes."""
    rows = session.execute(
        select(EscalationRecord, AlertRecord)
        .join(AlertRecord, AlertRecord.alert_id == EscalationRecord.alert_id)
        .where(EscalationRecord.delivered_at.is_(None))
        .order_by(EscalationRecord.id)
        .limit(limit)
    ).all()
    writes = []
    for step, record in rows:
        alert = to_alert(
            record,
            Escalation(
                level=step.level,
                kind=step.kind,
                reason=step.reason,
                original_owner=record.owner,
                from_owner=step.from_owner,
                to_owner=step.to_owner,
            ),
        )
        writes.append(
            (
                step.id,
                StreamWrite(
                    stream=keys.inbox(step.to_owner),
                    fields={"data": alert.model_dump_json()},
                    dedupe_key=keys.dedupe(f"alert:{record.alert_id}:escalation:{step.level}"),
                ),
                alert,
            )
        )
    return writes


class EscalationSweeper:
    """Runs in every worker; safe to run concurrently."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def sweep_once(self) -> SweepResult:
        result = await asyncio.to_thread(self._sweep)
        metrics.observe_sweep(escalated=result.escalated, breached=result.breached - result.repeated_breaches)
        # Logged once committed, before the copies go out: with Redis down, deliver() raises and the line was lost.
        if result.escalated or result.breached:
            # Counts always numbers: `conflicts=result.conflicts or None` logged "conflicts=None" (JSON null).
            log.info("escalations", escalated=result.escalated, sla_breaches=result.breached,
                     repeated_breaches=result.repeated_breaches, conflicts=result.conflicts)
        result.delivered = await self.deliver()
        return result

    def _sweep(self) -> SweepResult:
        result = SweepResult()
        now = self.pipeline.clock()
        owners = self.pipeline.ruleset.owners
        with Session(self.pipeline.engine) as session:
            for record in due_alerts(session, now=now):
                outcome = escalate(session, record, owners=owners, now=now)
                if outcome == "escalated":
                    result.escalated += 1
                elif outcome == "breached":
                    result.breached += 1
                elif outcome == "breached again":
                    result.breached += 1
                    result.repeated_breaches += 1
                elif outcome == "conflict":
                    result.conflicts += 1
            session.commit()
        return result

    async def deliver(self) -> int:
        keys = self.pipeline.keys
        delivered = 0
        while True:
            pending = await asyncio.to_thread(self._pending, keys)
            if not pending:
                return delivered
            settings = self.pipeline.settings
            await xadd_once(self.pipeline.redis, [w for _, w, _ in pending], ttl=settings.dedupe_ttl,
                            wait=settings.replica_wait)
            await asyncio.to_thread(self._mark_delivered, {i: alert for i, _, alert in pending})
            delivered += len(pending)
            if self.pipeline.channels is not None:
                await self.pipeline.channels.pump()

    def _pending(self, keys: Keys) -> list[tuple[int, StreamWrite, Alert]]:
        with Session(self.pipeline.engine) as session:
            return escalation_writes(session, keys)

    def _mark_delivered(self, copies: dict[int, Alert]) -> None:
        now = self.pipeline.clock()
        channels = self.pipeline.channels
        with Session(self.pipeline.engine) as session:
            for step in session.scalars(select(EscalationRecord).where(EscalationRecord.id.in_(list(copies)))):
                # Conditional, so two workers draining the same copy mark it once.
                marked = session.execute(
                    update(EscalationRecord)
                    .where(EscalationRecord.id == step.id, EscalationRecord.delivered_at.is_(None))
                    .values(delivered_at=now)
                    .execution_options(synchronize_session=False)
                )
                if marked.rowcount != 1:
                    continue
                if channels is not None:
                    # The manager gets the escalated copy on their own channels too.
                    queue_deliveries(
                        session, alert=copies[step.id], recipient=step.to_owner,
                        channels=channels.channels_for(step.to_owner), now=now,
                    )
                session.add(
                    AuditEvent(
                        alert_id=step.alert_id,
                        type="delivered",
                        actor=SYSTEM_ACTOR,
                        at=now,
                        detail={"channel": "inbox", "owner": step.to_owner, "escalation_level": step.level},
                    )
                )
            session.commit()
