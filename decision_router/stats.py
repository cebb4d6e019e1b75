"""Intervention-outcome statistics, read from the alerts table.

Definitions (also in the README):
- routed: alerts delivered to an owner (rule action `alert`); recorded: tracked only
  (action `record`); held_out: control records of a rule's holdout, not delivered;
  suppressed: matches inside a rule's cooldown, not delivered.
- escalations: steps up the manager chain; sla_breaches: deadlines missed at the top.
- intervention_rate = intervened / routed; success_rate = successes / (successes + failures),
  over routed alerts with an outcome; median_time_to_act_s from alert creation to the
  first `intervened` event. A rate with no denominator is null, never 0.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from decision_router.tables import AlertRecord, as_utc


class GroupBy(StrEnum):
    RULE = "rule"
    OWNER = "owner"
    MODEL = "model"


@dataclass(frozen=True)
class StatsRow:
    key: str
    routed: int
    recorded: int
    held_out: int
    suppressed: int
    acknowledged: int
    intervened: int
    successes: int
    failures: int
    intervention_rate: float | None
    success_rate: float | None
    median_time_to_act_s: float | None
    escalations: int
    sla_breaches: int

    def as_dict(self, by: GroupBy) -> dict[str, Any]:
        row = asdict(self)
        return {by.value: row.pop("key"), **row}


def ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class _Tally:
    routed: int = 0
    recorded: int = 0
    held_out: int = 0
    suppressed: int = 0
    acknowledged: int = 0
    intervened: int = 0
    successes: int = 0
    failures: int = 0
    escalations: int = 0
    sla_breaches: int = 0

    def __post_init__(self) -> None:
        self.times_to_act: list[float] = []

    def row(self, key: str) -> StatsRow:
        return StatsRow(
            key=key,
            routed=self.routed,
            recorded=self.recorded,
            held_out=self.held_out,
            suppressed=self.suppressed,
            acknowledged=self.acknowledged,
            intervened=self.intervened,
            successes=self.successes,
            failures=self.failures,
            intervention_rate=ratio(self.intervened, self.routed),
            success_rate=ratio(self.successes, self.successes + self.failures),
            median_time_to_act_s=median(self.times_to_act),
            escalations=self.escalations,
            sla_breaches=self.sla_breaches,
        )


def compute_stats(
    session: Session, *, by: GroupBy = GroupBy.RULE, since: datetime | None = None, until: datetime | None = None
) -> list[StatsRow]:
    """One row per group, sorted by routed (most first) then key."""
    column = getattr(AlertRecord, by.value)
    query = select(
        column,
        AlertRecord.action,
        AlertRecord.held_out,
        AlertRecord.suppressed_by,
        AlertRecord.created_at,
        AlertRecord.acknowledged_at,
        AlertRecord.intervened_at,
        AlertRecord.outcome,
        AlertRecord.escalation_level,
        AlertRecord.ack_breached_at,
        AlertRecord.act_breached_at,
    )
    if since is not None:
        query = query.where(AlertRecord.created_at >= since)
    if until is not None:
        query = query.where(AlertRecord.created_at < until)
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    for (
        key, action, held_out, suppressed_by, created_at, acknowledged_at, intervened_at, outcome,
        escalation_level, ack_breached_at, act_breached_at,
    ) in session.execute(query):
        tally = tallies[key]
        if suppressed_by:
            tally.suppressed += 1
            continue
        if held_out:
            tally.held_out += 1
            continue
        if action != "alert":
            tally.recorded += 1
            continue
        tally.routed += 1
        tally.escalations += escalation_level
        tally.sla_breaches += (ack_breached_at is not None) + (act_breached_at is not None)
        tally.acknowledged += acknowledged_at is not None
        if intervened_at is not None:
            tally.intervened += 1
            tally.times_to_act.append((as_utc(intervened_at) - as_utc(created_at)).total_seconds())
        tally.successes += outcome == "success"
        tally.failures += outcome == "failure"
    rows = [tally.row(key) for key, tally in tallies.items()]
    return sorted(rows, key=lambda r: (-r.routed, -r.recorded, -r.held_out, r.key))
