"""While a backlog lasts, the read loop reads the next batch and runs its gate and routing (Pipeline.prepare_predictions)
as the batch in hand is stored. On real Redis: the work overlaps, each batch is checked once, every prediction is
routed once, a stop finishes the batch read ahead, and a hot reload between the two makes it route again."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import timedelta

import pytest

from decision_router.keys import Keys
from decision_router.pipeline import Pipeline
from decision_router.service import running_service
from decision_router.tables import AlertRecord, PredictionRecord
from tests.integration.conftest import wait_until
from tests.integration.test_router_loop import count, prediction

pytestmark = pytest.mark.redis


def watched(monkeypatch: pytest.MonkeyPatch, *, store_seconds: float) -> list[tuple[str, tuple[str, ...]]]:
    """Events of the pipeline, in order: ("check", ids) when a batch is checked and routed, ("store" / "stored", ids)
    around its store step (made `store_seconds` slower, in its thread, as a large batch is)."""
    events: list[tuple[str, tuple[str, ...]]] = []
    checked_and_routed, store = Pipeline._checked_and_routed, Pipeline._store_predictions

    def check(self, entries):
        events.append(("check", tuple(entry_id for entry_id, _ in entries)))
        return checked_and_routed(self, entries)

    def slow_store(self, checked, *args):
        ids = tuple(entry_id for entry_id, _, _ in checked)
        events.append(("store", ids))
        time.sleep(store_seconds)
        try:
            return store(self, checked, *args)
        finally:
            events.append(("stored", ids))

    monkeypatch.setattr(Pipeline, "_checked_and_routed", check)
    monkeypatch.setattr(Pipeline, "_store_predictions", slow_store)
    return events


async def test_a_backlog_is_read_and_routed_ahead_while_the_batch_before_is_stored(
    settings, ruleset, engine, r, monkeypatch
) -> None:
    settings = settings.model_copy(update={"batch_size": 10})
    keys = Keys(settings.stream_prefix)
    events = watched(monkeypatch, store_seconds=0.2)
    for n in range(35):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"ahead-{n}", entity_id=f"acct-{n}"))})
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: count(engine, PredictionRecord) == 35, what="the backlog stored")
        await wait_until(lambda: r.xpending(keys.predictions, service.group)["pending"] == 0, what="all acked")
    stores = [ids for kind, ids in events if kind == "store"]
    assert [len(ids) for ids in stores] == [10, 10, 10, 5]
    checks = [ids for kind, ids in events if kind == "check"]
    assert checks == stores  # each batch checked and routed once: the read-ahead's work was used, not redone
    for before, batch in zip(stores, stores[1:], strict=False):
        # The next batch was checked while the one before was still in its store step.
        assert events.index(("check", batch)) < events.index(("stored", before))
    assert count(engine, AlertRecord) == 35
    assert r.xlen(keys.inbox("alice-moreau")) == 35


async def test_a_stop_finishes_the_batch_read_ahead(settings, ruleset, engine, r, monkeypatch) -> None:
    settings = settings.model_copy(update={"batch_size": 10, "shutdown_timeout": timedelta(seconds=20)})
    keys = Keys(settings.stream_prefix)
    events = watched(monkeypatch, store_seconds=0.5)
    for n in range(30):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"stop-{n}", entity_id=f"acct-{n}"))})
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: any(kind == "store" for kind, _ in events), what="the first store step")
        await wait_until(lambda: sum(kind == "check" for kind, _ in events) == 2, what="the batch read ahead")
        await service.stop()
        # Both batches in hand finished and acknowledged; the third never read.
        assert count(engine, PredictionRecord) == 20
        assert r.xpending(keys.predictions, service.group)["pending"] == 0
        assert r.xinfo_groups(keys.predictions)[0]["lag"] == 10


async def test_rules_reloaded_between_the_read_ahead_and_the_store_route_the_batch_again(
    settings, ruleset, engine, r, monkeypatch
) -> None:
    settings = settings.model_copy(update={"batch_size": 10})
    keys = Keys(settings.stream_prefix)
    events = watched(monkeypatch, store_seconds=0.3)
    for n in range(20):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(f"reload-{n}", entity_id=f"acct-{n}"))})
    reloaded = dataclasses.replace(ruleset)
    async with running_service(settings, ruleset, engine) as service:
        await wait_until(lambda: sum(kind == "check" for kind, _ in events) == 2, what="the batch read ahead")
        service.pipeline.ruleset = reloaded  # as a hot reload swaps it
        await wait_until(lambda: count(engine, PredictionRecord) == 20, what="both batches stored")
    checks = [ids for kind, ids in events if kind == "check"]
    assert len(checks) == 3 and checks[1] == checks[2]  # the second batch checked again, under the new rules
    assert count(engine, AlertRecord) == 20
