"""Hostile payloads through the real service on the real Redis (SQLite and PostgreSQL
stores): nothing crashes, every bad entry lands in the DLQ stream with a reason and is
counted, nothing stays pending, and DLQ entries + accepted predictions = entries published."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.contracts import RejectionReason
from decision_router.keys import Keys
from decision_router.rules import RuleSet
from decision_router.service import running_service
from decision_router.settings import Settings
from decision_router.tables import PredictionRecord, RejectionRecord
from tests.integration.conftest import wait_until
from tests.unit.test_hostile_payloads import encode, json_values, mutated, raw_texts

pytestmark = pytest.mark.redis
MAX_BYTES = 4096


def good(pid: str) -> dict[str, Any]:
    return {
        "prediction_id": pid, "model": "churn", "model_version": "2026.11", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": 0.93, "predicted_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        "context": {"segment": "enterprise", "account_manager": "alice-moreau", "arr": 120000},
    }


TEMPLATE = good("p-template")  # the shape mutated; its predicted_at is fresh for this test run
entries = st.one_of(
    st.builds(lambda pid, form: encode(good(f"ok-{pid}"), form), st.uuids(), st.sampled_from(["data", "flat"])),
    st.builds(encode, mutated(TEMPLATE), st.sampled_from(["data", "flat"])),
    st.dictionaries(raw_texts, raw_texts, min_size=1, max_size=4),
    st.builds(lambda value: {b"data": json.dumps({**TEMPLATE, "context": value}).encode()}, json_values),
)
NASTY = [
    {b"data": json.dumps({**TEMPLATE, "model": "churn\x00", "prediction_id": "nul"}).encode()},
    {b"data": json.dumps({**TEMPLATE, "prediction_id": "sur\ud800"}).encode()},
    {b"data": json.dumps({**TEMPLATE, "prediction_id": "nan", "context": {"arr": float("nan")}}).encode()},
    {b"data": b"[" * 3000},
    {b"data": b"x" * 70_000},  # over the default limit (64 KiB) too
    {b"prediction_id": b"\xff\xfe", b"model": b"churn"},
    {b"\x00": b"\x00"},
    {b"data": json.dumps({**TEMPLATE, "prediction_id": "big", "context": {"n": 10**400}}).encode()},
]


def count(engine: Engine, table: Any) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


async def run_batch(batch: list[dict], *, engine: Engine, ruleset: RuleSet, redis_url: str) -> None:
    prefix = f"hostile-{uuid.uuid4().hex[:10]}:"
    keys = Keys(prefix)
    # claim_idle at its default: bad entries must be settled by the read loop itself, not by a reclaim.
    settings = Settings(redis_url=redis_url, stream_prefix=prefix, consumer_name="worker-1", batch_size=50,
                        max_payload_bytes=MAX_BYTES, max_payload_depth=8)
    client = redis.Redis.from_url(redis_url)
    stored_before, rejected_before = count(engine, PredictionRecord), count(engine, RejectionRecord)
    try:
        async with running_service(settings, ruleset, engine):
            for fields in batch:
                client.xadd(keys.predictions, fields)

            def settled() -> bool:
                accepted = count(engine, PredictionRecord) - stored_before
                return accepted + client.xlen(keys.predictions_dlq) == len(batch)

            await wait_until(settled, what="every entry accepted or dead-lettered")
            # Still alive: a good prediction published after the hostile batch is routed.
            client.xadd(keys.predictions, encode(good(f"after-{uuid.uuid4().hex}"), "data"))
            await wait_until(lambda: count(engine, PredictionRecord) - stored_before + client.xlen(keys.predictions_dlq)
                             == len(batch) + 1, what="the good prediction after the batch")
            # Every entry acknowledged (after its batch is stored), none stuck.
            await wait_until(lambda: client.xpending(keys.predictions, settings.consumer_group)["pending"] == 0,
                             what="no entry left pending")
        dead = [fields for _, fields in client.xrange(keys.predictions_dlq)]
        for fields in dead:
            assert RejectionReason(fields[b"reason"].decode())  # a known reason...
            assert fields[b"detail"].strip()  # ...with a detail
            json.loads(fields[b"payload"])  # and the entry's fields, readable
        assert count(engine, RejectionRecord) - rejected_before == len(dead)  # counted in the store too
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(entries, min_size=1, max_size=10))
@example(batch=NASTY)
def test_hostile_batches_are_dead_lettered_and_nothing_is_lost(batch, engine, ruleset, redis_server) -> None:
    asyncio.run(run_batch(batch, engine=engine, ruleset=ruleset, redis_url=redis_server))


async def test_each_nasty_entry_gets_its_reason(service, r, settings) -> None:
    keys = Keys(settings.stream_prefix)
    published = [r.xadd(keys.predictions, fields) for fields in NASTY]
    await wait_until(lambda: r.xlen(keys.predictions_dlq) == len(NASTY), what="all nasty entries dead-lettered")
    reasons = {fields["source_id"]: fields["reason"] for _, fields in r.xrange(keys.predictions_dlq)}
    assert [reasons[entry_id] for entry_id in published] == [
        "invalid_encoding", "invalid_encoding", "schema", "too_deep", "too_large", "invalid_encoding",
        "invalid_encoding", "schema",
    ]


async def test_nasty_outcome_events_are_dead_lettered_too(service, r, settings) -> None:
    keys = Keys(settings.stream_prefix)
    event = {"type": "acknowledged", "alert_id": "al-1", "actor": "crm"}
    nasty = [
        {b"data": json.dumps({**event, "actor": "crm\x00"}).encode()},
        {b"data": json.dumps({**event, "value": float("inf")}).encode()},
        {b"data": b"{\"a\": " * 3000},
        {b"data": b"x" * 70_000},
        {b"type": b"acknowledged", b"alert_id": b"al-\xff", b"actor": b"crm"},
    ]
    published = [r.xadd(keys.outcomes, fields) for fields in nasty]
    await wait_until(lambda: r.xlen(keys.outcomes_dlq) == len(nasty), what="all nasty events dead-lettered")
    reasons = {fields["source_id"]: fields["reason"] for _, fields in r.xrange(keys.outcomes_dlq)}
    assert [reasons[entry_id] for entry_id in published] == [
        "invalid_encoding", "schema", "too_deep", "too_large", "invalid_encoding",
    ]
