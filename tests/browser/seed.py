"""A store with every dashboard figure non-trivial, seeded through the real pipeline.

Predictions and outcome events go through Pipeline.process_predictions / process_outcomes
(the quality gate, the shipped rules, the tracker), and the escalation sweeper runs once,
so the dashboard reads what the service itself would have written. The pipeline's clock
is moved by hand: decisions are made on two days, two days before `now`, so their
deadlines have passed and some alerts are overdue and escalated.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlmodel import Session

from decision_router.escalation import EscalationSweeper
from decision_router.pipeline import Pipeline
from decision_router.tables import AlertRecord
from decision_router.tracker import alert_id_for

WATCH = "enterprise-churn-watch"  # holdout 0.1: has an uplift
RISK = "enterprise-churn-risk"  # no holdout: no uplift
MID = "mid-market-churn-risk"  # holdout 0.1, few predictions: "not enough data"
OWNER = "alice-moreau"  # the owner who logs in to the dashboard
N_WATCH = 200  # enough entities for >= 10 held out with an outcome
# Minutes from alert creation to the intervention, cycled over the acted-on alerts: spans
# the time-to-act buckets (< 15m, 15m-1h, 1h-4h, 1d-2d).
ACT_AFTER_MIN = (5, 10, 30, 45, 90, 200, 1800)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _prediction(pid: str, at: datetime, *, score: float, segment: str, manager: str, model: str = "churn") -> dict:
    return {
        "prediction_id": pid, "model": model, "model_version": "2026.11", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": score, "predicted_at": (at - timedelta(minutes=5)).isoformat(),
        "features": {"top_drivers": ["usage_drop", "champion_left"]},
        "context": {"segment": segment, "account_manager": manager, "arr": 120000, "renewal_date": "2027-02-01",
                    "region": "emea"},
    }


def _entries(documents: list[dict], start: int) -> list[tuple[str, dict[str, str]]]:
    return [(f"{start + i}-0", {"data": json.dumps(d)}) for i, d in enumerate(documents)]


async def seed(pipeline: Pipeline, clock: Clock, now: datetime) -> dict[str, list[str]]:
    """Seed the store; returns the alert ids by role: owner_open (alice's unacknowledged alerts)."""
    day1 = (now - timedelta(days=2)).replace(hour=9, minute=0, second=0, microsecond=0)
    day2 = day1 + timedelta(days=1)
    managers = ("alice-moreau", "elena-petrova")

    # Day 1: the watch rule's 200 entities, some mid-market ones, and bad input.
    clock.now = day1
    watch = [_prediction(f"w{i}", day1, score=0.7, segment="enterprise", manager=managers[i % 2]) for i in range(N_WATCH)]
    mid = [_prediction(f"m{i}", day1, score=0.75, segment="mid-market", manager="maya-patel") for i in range(6)]
    bad = [
        {"data": json.dumps({**_prediction("bad1", day1, score=0.9, segment="smb", manager="x"), "score": 1.7})},
        {"data": json.dumps({**_prediction("bad2", day1, score=0.9, segment="smb", manager="x"), "score": -1})},
        {"data": "{not json"},
    ]
    await pipeline.process_predictions(_entries(watch + mid, 1) + [(f"{500 + i}-0", b) for i, b in enumerate(bad)])

    # Day 2: the high-risk rule, alice and elena, and one more rejection of another kind.
    clock.now = day2
    risk = [_prediction(f"r{i}", day2, score=0.92, segment="enterprise", manager=managers[i % 3 == 2]) for i in range(9)]
    stale = {**_prediction("old", day2, score=0.9, segment="smb", manager="x"),
             "predicted_at": (day2 - timedelta(days=3)).isoformat()}
    await pipeline.process_predictions(_entries(risk + [stale], 1000))

    # Outcome events. Watch: ack + act for every third treated entity, outcomes for all
    # (treated succeed 3 in 5, control 3 in 10), by entity as a CRM would send them.
    with Session(pipeline.engine) as session:
        control = set(session.scalars(select(AlertRecord.alert_id).where(AlertRecord.held_out.is_(True))))
    events: list[dict] = []
    acted = 0
    for i in range(N_WATCH):
        alert_id = alert_id_for(f"w{i}", WATCH)
        held_out = alert_id in control
        if i % 3 == 0 and not held_out:
            events.append({"alert_id": alert_id, "type": "acknowledged", "actor": managers[i % 2],
                           "at": (day1 + timedelta(minutes=2)).isoformat()})
            minutes = ACT_AFTER_MIN[acted % len(ACT_AFTER_MIN)]
            acted += 1
            events.append({"alert_id": alert_id, "type": "intervened", "actor": managers[i % 2], "action": "call",
                           "at": (day1 + timedelta(minutes=minutes)).isoformat()})
        result = "success" if (i % 10 < 3 if held_out else i % 5 < 3) else "failure"
        events.append({"entity_type": "account", "entity_id": f"acct-w{i}", "type": "outcome", "result": result,
                       "actor": "crm", "at": (day2 + timedelta(hours=1)).isoformat()})
    # Risk: r0 acknowledged and acted on, r1 acknowledged only, the rest open.
    events.append({"alert_id": alert_id_for("r0", RISK), "type": "intervened", "actor": OWNER, "action": "exec call",
                   "at": (day2 + timedelta(minutes=20)).isoformat()})
    events.append({"alert_id": alert_id_for("r1", RISK), "type": "acknowledged", "actor": OWNER,
                   "at": (day2 + timedelta(minutes=3)).isoformat()})
    # Mid-market: two outcomes, too few for an uplift.
    events += [{"entity_type": "account", "entity_id": f"acct-m{i}", "type": "outcome", "result": "success",
                "actor": "crm", "at": (day2 + timedelta(hours=1)).isoformat()} for i in range(2)]
    # An outcome for no known alert: an outcome-stream rejection.
    events.append({"alert_id": "al-nope", "type": "acknowledged", "actor": "crm"})
    clock.now = day1 + timedelta(minutes=max(ACT_AFTER_MIN) + 60)  # after every event's `at`: none is in the future
    await pipeline.process_outcomes([(f"{2000 + i}-0", {"data": json.dumps(e)}) for i, e in enumerate(events)])

    # The high-risk alerts not acknowledged within 2h escalate once.
    clock.now = day2 + timedelta(hours=3)
    await EscalationSweeper(pipeline).sweep_once()
    clock.now = now
    owner_open = [alert_id_for(f"r{i}", RISK) for i in range(9) if i % 3 != 2]
    return {"owner_open": owner_open}
