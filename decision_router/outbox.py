"""The outbox drained while the router runs, not only at start.

A batch writes its alerts to the inboxes right after committing them (pipeline.py). When that write fails
with an error that is no outage (a key of the wrong type where an inbox goes, a script error), the batch is
retried and then dead-lettered or acknowledged, and its alerts stay in the store undelivered. Every worker
drains them every DECISION_ROUTER_SWEEP_INTERVAL, in chunks, through the partial index that holds only
undelivered alerts (tables.OUTBOX_PENDING). It leaves alone those younger than GRACE: the batch that stored
them is delivering them now. Two drains (workers) at once write an alert once (its inbox dedupe marker) and
mark it once (the mark holds only while undelivered).

An alert whose write kills the worker each time (no error is ever caught) would stop every drain, at start
and every sweep, so that the worker never routes. Each write is counted in Redis (Keys.outbox_attempts)
before it is made and uncounted when it returns: what is left counts the writes whose worker went. Past
max_attempts of those an alert is written on its own, and one more parks it (Keys.outbox_parked): left
undelivered in the store, logged, counted (decision_router_outbox_parked_total) and skipped by every drain,
which logs it, until an operator removes it from the hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from decision_router import metrics
from decision_router.consumer import infrastructure_failure
from decision_router.contracts import Alert
from decision_router.pipeline import Pipeline

log = structlog.get_logger("decision_router.outbox")

# Alerts this young are left to the batch that stored them (it writes them within milliseconds; a batch
# retried after an outage writes them again itself).
GRACE = timedelta(seconds=30)
# Alerts per read and per inbox write: one script call's worth (streams.WRITES_PER_CALL is 250).
CHUNK = 500
# The owners a "left undelivered" log line names.
SHOWN_OWNERS = 10
# Counts (ARGV[1] = 1, with the hash's TTL in ms) or uncounts (-1, a field at 0 removed) the alerts ARGV[3:]:
# one round trip, one key.
_COUNT = """
local delta = tonumber(ARGV[1])
for i = 3, #ARGV do
    local left = redis.call('HINCRBY', KEYS[1], ARGV[i], delta)
    if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
if delta > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


@dataclass
class DrainResult:
    delivered: int = 0  # marked delivered by this drain (not by another worker's at the same time)
    failed: list[Alert] = field(default_factory=list)  # left undelivered: their inbox write failed
    error: str = ""  # the first such failure
    parked: list[Alert] = field(default_factory=list)  # skipped: their write stopped the worker each time


class OutboxDrain:
    """Delivers the alerts a batch left undelivered (see the module's docstring)."""

    def __init__(self, pipeline: Pipeline, *, grace: timedelta = GRACE, chunk: int = CHUNK) -> None:
        self.pipeline = pipeline
        self.grace = grace
        self.chunk = chunk
        self.keys = pipeline.keys
        # Writes that returned but could not be uncounted (Redis unreachable): uncounted by the next drain.
        self._owed: list[str] = []

    async def drain_once(self, *, grace: timedelta | None = None) -> int:
        """Deliver the undelivered alerts older than the grace (`grace` overrides it: 0 at start, all of them);
        returns how many. An alert whose inbox write fails is logged and left for the next drain, not in the way
        of the others. An outage ends the drain (raised: the caller waits it out); any other error is logged in
        one line and the next drain tries again."""
        try:
            result = await self._drain(self.grace if grace is None else grace)
        except Exception as exc:
            if infrastructure_failure(exc) is not None:
                raise
            log.warning("outbox drain failed; will retry", error=one_line(exc))
            return 0
        if result.delivered:
            log.info("outbox drained", delivered=result.delivered)
        if result.failed:
            owners = sorted({alert.owner for alert in result.failed})
            log.warning("alerts left undelivered in the outbox; will retry", alerts=len(result.failed),
                        owners=owners[:SHOWN_OWNERS], error=result.error)
        if result.parked:
            log.warning("alerts parked in the outbox, not written: writing them stopped the worker each time; "
                        f"HDEL {self.keys.outbox_parked} <alert id> to try one again", alerts=len(result.parked),
                        alert_ids=[alert.alert_id for alert in result.parked][:SHOWN_OWNERS])
        return result.delivered

    async def _drain(self, grace: timedelta) -> DrainResult:
        result = DrainResult()
        if self._owed:
            await self._count(self._owed, -1)
            self._owed = []
        before = self.pipeline.clock() - grace
        after: Alert | None = None
        while True:
            alerts = await self._chunk(before, after)
            if not alerts:
                break
            await self._deliver(alerts, result)
            if len(alerts) < self.chunk:
                break
            after = alerts[-1]
        await self.pipeline.pump_channels()
        return result

    async def _chunk(self, before: datetime, after: Alert | None) -> list[Alert]:
        return await asyncio.to_thread(self.pipeline.undelivered_before, before, after=after, limit=self.chunk)

    async def _deliver(self, alerts: Sequence[Alert], result: DrainResult) -> None:
        """The chunk in one write; if that fails (no outage), each alert on its own, so that one bad inbox
        leaves only its own alerts undelivered. Alerts whose writes stopped the worker max_attempts times are
        written on their own; one that stopped it on its own too is parked (see the module's docstring)."""
        limit = self.pipeline.settings.max_attempts
        ids = [alert.alert_id for alert in alerts]
        parked = await self.pipeline.redis.hmget(self.keys.outbox_parked, ids)
        stopped = await self.pipeline.redis.hmget(self.keys.outbox_attempts, ids)
        together: list[Alert] = []
        alone: list[Alert] = []
        for alert, is_parked, count in zip(alerts, parked, stopped, strict=True):
            times = int(count or 0)
            if is_parked is not None:
                result.parked.append(alert)
            elif times > limit:  # it stopped the worker while written on its own
                await self._park(alert, times)
                result.parked.append(alert)
            else:
                (alone if times >= limit else together).append(alert)
        if together:
            try:
                result.delivered += await self._write(together)
                together = []
            except Exception as exc:
                if infrastructure_failure(exc) is not None:
                    raise
        singles = {alert.alert_id for alert in [*together, *alone]}
        for alert in [alert for alert in alerts if alert.alert_id in singles]:  # in the drain's order
            try:
                result.delivered += await self._write([alert])
            except Exception as exc:
                if infrastructure_failure(exc) is not None:
                    raise
                result.failed.append(alert)
                result.error = result.error or one_line(exc)

    async def _write(self, alerts: list[Alert]) -> int:
        """One inbox write, counted while it runs: if its worker goes, the count stays (no handler runs)."""
        ids = [alert.alert_id for alert in alerts]
        await self._count(ids, 1)
        try:
            delivered = await self.pipeline.write_to_inboxes(alerts)
        except (Exception, asyncio.CancelledError):  # it returned (an error, a stop): no death
            await self._uncount(ids)
            raise
        # Written: its earlier counts no longer matter (left by an outage, they expire with the hash).
        with contextlib.suppress(Exception):
            await self.pipeline.redis.hdel(self.keys.outbox_attempts, *ids)
        return delivered

    async def _uncount(self, ids: list[str]) -> None:
        try:
            await self._count(ids, -1)
        except Exception:  # noqa: BLE001 - Redis unreachable: the next drain uncounts them
            self._owed.extend(ids)

    async def _count(self, ids: Sequence[str], delta: int) -> None:
        ttl_ms = int(self.pipeline.settings.dedupe_ttl.total_seconds() * 1000)
        await self.pipeline.redis.eval(_COUNT, 1, self.keys.outbox_attempts, delta, ttl_ms, *ids)

    async def _park(self, alert: Alert, times: int) -> None:
        """Set aside until an operator removes it: logged and counted once, by the drain that parks it."""
        why = json.dumps({"owner": alert.owner, "prediction_id": alert.prediction_id, "stopped": times,
                          "parked_at": self.pipeline.clock().isoformat()})
        if await self.pipeline.redis.hsetnx(self.keys.outbox_parked, alert.alert_id, why):
            metrics.OUTBOX_PARKED.inc()
            log.error("alert parked in the outbox: writing it to its inbox stopped the worker each time; left "
                      "undelivered in the store", alert_id=alert.alert_id, owner=alert.owner, stopped=times,
                      parked=self.keys.outbox_parked)
        await self.pipeline.redis.hdel(self.keys.outbox_attempts, alert.alert_id)


def one_line(exc: BaseException) -> str:
    """An error as a log field: its type and message, on one line, bounded."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
