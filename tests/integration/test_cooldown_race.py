"""A rule's cooldown across workers, on real Redis and both stores: pipelines routing the same
entities at the same instant (threads released together by a barrier, round after round) make
exactly one decision per (rule, entity) window, and store every other one as suppressed by it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlmodel import Session

from decision_router import cooldowns
from decision_router.keys import Keys
from decision_router.pipeline import BatchResult, Pipeline
from decision_router.router import in_holdout
from decision_router.rules import load_rules
from decision_router.tables import AlertRecord, as_utc
from tests.integration.conftest import ManualClock

pytestmark = pytest.mark.redis

COOLDOWN = timedelta(hours=1)
ROUTING = """
rules:
  - name: churn-high
    when: {model: churn, score: {gte: 0.8}}
    owner: am
    cooldown: 1h
    holdout: 0.5
  - {name: rest, when: {}, owner: desk, action: record}
"""
OWNERS = "owners:\n  - {id: am, name: Account Manager}\n  - {id: desk, name: Desk}\n"
T0 = datetime.now(UTC).replace(microsecond=0)
WORKERS = 3
ROUNDS = 15
# Reused every round, each round after the last window ended (an expired claim is taken over),
# plus one entity new in each round (a first claim).
SHARED = [f"acct-{n}" for n in range(8)]


def entities(round_: int) -> list[str]:
    return [*SHARED, f"acct-new-{round_}"]


def batch(round_: int, worker: int, at: datetime) -> list[tuple[str, dict]]:
    """One prediction per entity, each worker its own prediction ids, odd workers in reverse order
    (two transactions taking the same cooldowns in opposite orders must not deadlock)."""
    names = entities(round_)
    if worker % 2:
        names.reverse()
    entries = []
    for n, entity in enumerate(names):
        document = {"prediction_id": f"p-{round_}-{worker}-{entity}", "model": "churn", "model_version": "1",
                    "entity_type": "account", "entity_id": entity, "score": 0.9, "predicted_at": at.isoformat()}
        entries.append((f"{round_ * 1000 + worker * 100 + n + 1}-0", {"data": json.dumps(document)}))
    return entries


def run_workers(settings, engine, rules_dir: Path) -> list[BatchResult]:
    """WORKERS threads, each with its own event loop, Redis client and Pipeline on the same store;
    a barrier releases them together into every round, the clock a cooldown further each time."""
    clock = ManualClock(T0)
    ruleset = load_rules(rules_dir)
    results: list[BatchResult] = []
    errors: list[BaseException] = []
    rounds = iter(range(ROUNDS))

    def next_round() -> None:
        clock.now = T0 + next(rounds, ROUNDS) * (COOLDOWN + timedelta(minutes=1))

    barrier = threading.Barrier(WORKERS, action=next_round, timeout=60)

    async def work(worker: int) -> None:
        redis = Redis.from_url(settings.redis_url)
        pipeline = Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock)
        try:
            for round_ in range(ROUNDS):
                barrier.wait()
                results.append(await pipeline.process_predictions(batch(round_, worker, clock.now)))
        finally:
            await redis.aclose()

    def thread(worker: int) -> None:
        try:
            asyncio.run(work(worker))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=thread, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return results


def test_workers_routing_the_same_entities_at_once_make_one_decision_per_window(
    settings, engine, rules_dir, r, monkeypatch
):
    lost = []  # claims another worker won: proof that the workers did collide
    claim = cooldowns.claim

    def counting_claim(*args, **kwargs):
        try:
            claim(*args, **kwargs)
        except cooldowns.ClaimLost as exc:
            lost.append(exc.keys)
            raise

    monkeypatch.setattr(cooldowns, "claim", counting_claim)
    held_out = {e for n in range(ROUNDS) for e in entities(n) if in_holdout("churn-high", "account", e, 0.5)}
    assert held_out & set(SHARED) and set(SHARED) - held_out, "control and treated decisions both race"

    results = run_workers(settings, engine, rules_dir)

    with Session(engine) as session:
        rows = session.scalars(select(AlertRecord).where(AlertRecord.rule == "churn-high")).all()
    windows: dict[tuple[str, datetime], list[AlertRecord]] = defaultdict(list)
    for row in rows:
        windows[(row.entity_id, as_utc(row.created_at))].append(row)
    assert len(windows) == ROUNDS * len(entities(0)) and len(rows) == WORKERS * len(windows)
    duplicates = []
    for (entity, at), decisions in sorted(windows.items()):
        holders = [d for d in decisions if d.suppressed_by is None]
        if len(holders) != 1:
            duplicates.append(f"{entity} at {at:%H:%M}: {len(holders)} unsuppressed decisions")
            continue
        (holder,) = holders
        assert holder.held_out == (entity in held_out)
        assert sorted(d.suppressed_by for d in decisions if d is not holder) == [holder.alert_id] * (WORKERS - 1)
        assert all(d.status == "suppressed" and d.delivered_at is None for d in decisions if d is not holder)
    assert not duplicates, f"{len(duplicates)} of {len(windows)} windows: " + "; ".join(duplicates[:5])
    assert lost, "no worker ever lost a claim: the test did not make them collide"

    control = sum(e in held_out for n in range(ROUNDS) for e in entities(n))
    treated = len(windows) - control
    assert sum(res.alerts for res in results) == treated
    assert sum(res.held_out for res in results) == control
    assert sum(res.suppressed for res in results) == (WORKERS - 1) * ROUNDS * len(entities(0))
    inbox = [json.loads(fields["data"]) for _, fields in r.xrange(Keys(settings.stream_prefix).inbox("am"))]
    assert len(inbox) == treated and len({a["alert_id"] for a in inbox}) == treated
