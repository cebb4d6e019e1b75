"""The outbox drained while the router runs, not only at start.

A batch writes its alerts to the inboxes right after committing them (pipeline.py). When that write fails
with an error that is no outage (a key of the wrong type where an inbox goes, a script error), the batch is
retried and then dead-lettered or acknowledged, and its alerts stay in the store undelivered. Every worker
drains them every DECISION_ROUTER_SWEEP_INTERVAL, in chunks, through the partial index that holds only
undelivered alerts (tables.OUTBOX_PENDING). It leaves alone those younger than GRACE: the batch that stored
them is delivering them now. Two drains (workers) at once write an alert once (its inbox dedupe marker) and
mark it once (the mark holds only while undelivered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

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


@dataclass
class DrainResult:
    delivered: int = 0  # marked delivered by this drain (not by another worker's at the same time)
    failed: list[Alert] = field(default_factory=list)  # left undelivered: their inbox write failed
    error: str = ""  # the first such failure


class OutboxDrain:
    """Delivers the alerts a batch left undelivered (see the module's docstring)."""

    def __init__(self, pipeline: Pipeline, *, grace: timedelta = GRACE, chunk: int = CHUNK) -> None:
        self.pipeline = pipeline
        self.grace = grace
        self.chunk = chunk

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
        return result.delivered

    async def _drain(self, grace: timedelta) -> DrainResult:
        result = DrainResult()
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
        leaves only its own alerts undelivered."""
        try:
            result.delivered += await self.pipeline.write_to_inboxes(list(alerts))
            return
        except Exception as exc:
            if infrastructure_failure(exc) is not None:
                raise
        for alert in alerts:
            try:
                result.delivered += await self.pipeline.write_to_inboxes([alert])
            except Exception as exc:
                if infrastructure_failure(exc) is not None:
                    raise
                result.failed.append(alert)
                result.error = result.error or one_line(exc)


def one_line(exc: BaseException) -> str:
    """An error as a log field: its type and message, on one line, bounded."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
