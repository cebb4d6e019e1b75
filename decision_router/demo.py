"""`decision-router demo`: the whole loop in one process, on the embedded Redis and SQLite.

Synthetic churn predictions go through the real service (gate, rules, store, inboxes);
simulated account managers read their inboxes and record what they did; a simulated
CRM reports renewals and churn by entity. The service runs on a clock three days
behind, so the simulated actions of the following days are already in the past; at the
end the clock catches up and the SLA sweeper escalates what nobody acted on.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from rich.console import Console
from sqlalchemy import func, select
from sqlmodel import Session

from decision_router.contracts import Alert
from decision_router.embedded import EmbeddedRedis
from decision_router.keys import Keys
from decision_router.pipeline import utcnow
from decision_router.rules import RuleSet, load_rules
from decision_router.service import running_service
from decision_router.settings import Settings
from decision_router.stats import GroupBy, StatsRow, compute_stats
from decision_router.store import create_schema, make_engine
from decision_router.tables import AuditEvent, PredictionRecord, RejectionRecord

DEMO_DATABASE = "decision_router_demo.db"
CLOCK_OFFSET = timedelta(days=3)
SEGMENTS = [("enterprise", 0.15), ("strategic", 0.05), ("mid-market", 0.35), ("smb", 0.45)]
DRIVERS = ["usage_drop", "support_tickets", "champion_left", "price_increase", "low_adoption", "late_payments"]
ACTIONS = ["exec-call", "success-plan", "discount-offer", "training-session", "health-check"]


@dataclass(frozen=True)
class DemoResult:
    rows: list[StatsRow]
    by: GroupBy


def _account_managers(ruleset: RuleSet) -> list[str]:
    managers = [o.id for o in ruleset.owners.values() if o.team == "account-management"]
    return managers or list(ruleset.owners)


def synthetic_predictions(count: int, *, rng: random.Random, managers: list[str], now: datetime) -> list[dict[str, Any]]:
    """Mostly valid churn predictions, plus the kinds of bad input production sends."""
    documents: list[dict[str, Any]] = []
    for n in range(count):
        segment = rng.choices([s for s, _ in SEGMENTS], weights=[w for _, w in SEGMENTS])[0]
        manager = rng.choice(managers) if rng.random() > 0.05 else None  # some accounts have none
        context: dict[str, Any] = {
            "segment": segment,
            "arr": rng.choice([12_000, 48_000, 120_000, 350_000, 900_000]),
            "renewal_date": (now + timedelta(days=rng.randint(10, 200))).date().isoformat(),
            "region": rng.choice(["emea", "amer", "apac"]),
        }
        if manager:
            context["account_manager"] = manager
        documents.append(
            {
                "prediction_id": f"demo-{n:06d}",
                "model": "churn",
                "model_version": rng.choice(["2026.10", "2026.11"]),
                "entity_type": "account",
                "entity_id": f"acct-{rng.randint(1, count):05d}",
                "score": round(rng.betavariate(2, 3), 3),
                "predicted_at": (now - timedelta(minutes=rng.randint(1, 120))).isoformat(),
                "features": {"top_drivers": rng.sample(DRIVERS, 2)},
                "context": context,
            }
        )
    # Bad input, as production sends it: each kind lands in predictions:dlq with its reason.
    bad = max(1, count // 50)
    for n in range(bad):
        doc = dict(documents[rng.randrange(count)])
        kind = n % 4
        if kind == 0:
            doc["score"] = 1.7
        elif kind == 1:
            doc["entity_id"] = ""
        elif kind == 2:
            doc["predicted_at"] = (now - timedelta(days=30)).isoformat()
        # kind 3: an exact resend of an earlier prediction_id (a duplicate)
        if kind != 3:
            doc["prediction_id"] = f"demo-bad-{n:05d}"
        documents.append(doc)
    return documents


async def _wait_for(condition, *, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _simulate_owner(alert: Alert, rng: random.Random) -> tuple[list[dict[str, Any]], bool]:
    """What an account manager does with one alert; returns events and whether they intervened."""
    events: list[dict[str, Any]] = []
    eager = {"high": 0.9, "normal": 0.7}.get(alert.priority, 0.5)
    if rng.random() > eager:
        return events, False
    acked = alert.created_at + timedelta(minutes=rng.randint(5, 600))
    events.append({"type": "acknowledged", "alert_id": alert.alert_id, "actor": alert.owner, "at": acked.isoformat()})
    if rng.random() > 0.65:
        return events, False
    acted = acked + timedelta(hours=rng.uniform(0.5, 40))
    events.append(
        {"type": "intervened", "alert_id": alert.alert_id, "actor": alert.owner,
         "action": rng.choice(ACTIONS), "at": acted.isoformat()}
    )
    return events, True


async def run_demo(
    settings: Settings, *, predictions: int, seed: int, database_url: str | None, console: Console
) -> DemoResult:
    started = time.monotonic()
    rng = random.Random(seed)
    ruleset = load_rules(settings.rules_dir)
    if database_url is None:
        Path(DEMO_DATABASE).unlink(missing_ok=True)
        database_url = f"sqlite:///{DEMO_DATABASE}"
    engine = make_engine(database_url)
    create_schema(engine)
    keys = Keys("demo:")
    sim_now = utcnow() - CLOCK_OFFSET
    with EmbeddedRedis(settings.embedded_host, 0) as embedded:
        demo_settings = settings.model_copy(
            update={"redis_url": embedded.url, "stream_prefix": keys.prefix, "consumer_name": "demo-worker"}
        )
        redis = Redis.from_url(embedded.url)
        offset = [CLOCK_OFFSET]  # moved to zero at the end, when the simulated days have passed
        async with running_service(demo_settings, ruleset, engine, clock=lambda: utcnow() - offset[0]) as service:
            documents = synthetic_predictions(
                predictions, rng=rng, managers=_account_managers(ruleset), now=sim_now
            )
            console.print(f"publishing {len(documents)} predictions to {keys.predictions} (embedded Redis at {embedded.url})")
            async with redis.pipeline(transaction=False) as pipe:
                for doc in documents:
                    pipe.xadd(keys.predictions, {"data": json.dumps(doc)})
                await pipe.execute()

            def all_routed() -> bool:
                with Session(engine) as s:
                    accepted = s.scalar(select(func.count()).select_from(PredictionRecord))
                    rejected = s.scalar(select(func.count()).select_from(RejectionRecord))
                return (accepted or 0) + (rejected or 0) >= len(documents)

            await _wait_for(all_routed, what="predictions to be routed")
            outcomes = await _simulate(redis, keys, ruleset, rng)
            console.print(f"owners and the CRM recorded {outcomes} events on {keys.outcomes}")

            def all_recorded() -> bool:
                with Session(engine) as s:
                    applied = s.scalar(select(func.count(func.distinct(AuditEvent.source_id))))
                    rejected = s.scalar(
                        select(func.count()).select_from(RejectionRecord).where(RejectionRecord.source_stream == keys.outcomes)
                    )
                return (applied or 0) + (rejected or 0) >= outcomes

            await _wait_for(all_recorded, what="outcomes to be recorded")
            # Three days later: whatever nobody acted on has missed its deadline.
            offset[0] = timedelta(0)
            swept = await service.sweeper.sweep_once()
            console.print(
                f"SLA sweep {CLOCK_OFFSET.days} days later: {swept.escalated} alerts escalated to a manager, "
                f"{swept.breached} SLA breaches at the top of a chain"
            )
        await redis.aclose()
    with Session(engine) as session:
        rows = compute_stats(session, by=GroupBy.RULE)
        rejected = session.execute(
            select(RejectionRecord.reason, func.count()).group_by(RejectionRecord.reason).order_by(RejectionRecord.reason)
        ).all()
    engine.dispose()
    console.print(
        "quality gate rejected: " + (", ".join(f"{reason} {n}" for reason, n in rejected) or "nothing")
        + f" (see {keys.predictions_dlq})"
    )
    console.print(f"demo finished in {time.monotonic() - started:.1f}s; store: {database_url}")
    console.print(f"explore it: DECISION_ROUTER_DATABASE_URL={database_url} decision-router stats --by owner")
    return DemoResult(rows=rows, by=GroupBy.RULE)


async def _simulate(redis: Redis, keys: Keys, ruleset: RuleSet, rng: random.Random) -> int:
    """Owners read their inboxes and act; then the CRM reports each account's fate by entity."""
    events: list[dict[str, Any]] = []
    fate: dict[tuple[str, str], bool] = {}  # entity -> did anyone intervene
    for owner in ruleset.owners:
        for _entry_id, fields in await redis.xrange(keys.inbox(owner)):
            alert = Alert.model_validate_json(fields[b"data"])
            owner_events, intervened = _simulate_owner(alert, rng)
            events.extend(owner_events)
            key = (alert.entity_type, alert.entity_id)
            fate[key] = fate.get(key, False) or intervened
    for (entity_type, entity_id), intervened in sorted(fate.items()):
        if rng.random() < 0.2:
            continue  # not renewed or churned yet
        renewed = rng.random() < (0.72 if intervened else 0.55)
        events.append(
            {"type": "outcome", "entity_type": entity_type, "entity_id": entity_id, "actor": "crm",
             "result": "success" if renewed else "failure", "at": utcnow().isoformat()}
        )
    async with redis.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(keys.outcomes, {"data": json.dumps(event)})
        await pipe.execute()
    return len(events)
