"""Context enrichment without servers: key formatting, which sources are looked up, Redis
hashes on fakeredis, SQL on SQLite, and failures that never fail routing."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import sqlalchemy
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import event
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from decision_router import metrics
from decision_router.contracts import Prediction
from decision_router.enrich import (
    SQL_THREADS,
    ContextEnricher,
    LookupLimits,
    NotUtf8,
    bounded,
    build_enricher,
    hash_key,
    jsonable,
    redact,
    referenced_fields,
    run_queries,
)
from decision_router.keys import Keys
from decision_router.rules import RuleSet, load_rules
from decision_router.settings import PayloadLimits
from decision_router.store import make_engine

OWNERS = "owners:\n  - {id: desk, name: Desk}\n  - {id: gold-desk, name: Gold Desk}\n"
CRM = '  crm: {redis_hash: "context:{entity_type}:{entity_id}"}\n'
BILLING = '  billing: {sql: "select overdue_amount, plan from billing_accounts where account_id = :entity_id"}\n'
NOW = datetime.now(UTC)


# The fields the default rule reads of every source: only fields some rule reads are kept.
READ = ("tier", "overdue_amount", "plan")


def ruleset_with(tmp_path: Path, sources: str, rules: str | None = None, name: str = "rules") -> RuleSet:
    """A rule set declaring `sources`; by default one rule uses every one of them (its READ fields)."""
    if rules is None:
        names = [line.split(":")[0].strip() for line in sources.splitlines() if line.strip()]
        used = ", ".join(f"lookup.{n}.{field}" for n in names for field in READ)
        rules = f"rules:\n  - {{name: a, when: {{}}, owner: desk, continue: true, context: [{used}]}}\n" \
                "  - {name: rest, when: {}, owner: desk}\n"
    directory = tmp_path / name
    directory.mkdir()
    (directory / "routing.yaml").write_text("context_sources:\n" + sources + rules)
    (directory / "owners.yaml").write_text(OWNERS)
    return load_rules(directory)


def prediction(pid: str, entity_id: str | None = None, **overrides: Any) -> Prediction:
    fields: dict[str, Any] = dict(
        prediction_id=pid, model="churn", model_version="1", entity_type="account",
        entity_id=entity_id or f"acct-{pid}", score=0.9, predicted_at=NOW,
    )
    return Prediction(**{**fields, **overrides})


def warnings_of(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning"]


@pytest.fixture
async def fake() -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'context.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("create table billing_accounts (account_id text primary key, overdue_amount real, plan text)")
        connection.exec_driver_sql("insert into billing_accounts values ('acct-1', 1250.5, 'pro'), ('acct-2', 0, 'basic')")
    yield engine
    engine.dispose()


def count_queries(engine: Engine, needle: str) -> list[dict[str, Any]]:
    """Parameters of every statement run on `engine` that contains `needle`."""
    seen: list[dict[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if needle in statement:
            seen.append(parameters)

    return seen


# keys and references ---------------------------------------------------------------------


def test_hash_key_is_prefix_then_pattern_with_the_prediction() -> None:
    p = prediction("p1", "acct:{17}", model="churn-v2")
    assert hash_key("context:{entity_type}:{entity_id}", p) == "context:account:acct:{17}"
    assert hash_key("context:{entity_type}:{entity_id}", p, prefix="tenant-a:") == "tenant-a:context:account:acct:{17}"
    assert hash_key("ctx:{model}:{prediction_id}", p, prefix="t:") == "t:ctx:churn-v2:p1"
    assert hash_key("static", p, prefix="t:") == "t:static"


def test_only_sources_a_rule_uses_are_looked_up_in_order_of_use(tmp_path: Path) -> None:
    sources = CRM + BILLING + '  unused: {redis_hash: "x:{entity_id}"}\n  owners: {redis_hash: "o:{entity_id}"}\n'
    rules = """
rules:
  - {name: a, when: {model: churn}, owner: {from: lookup.owners.am, fallback: desk}, context: [lookup.billing.plan]}
  - {name: b, when: {lookup.crm.tier: gold}, owner: desk, context: [lookup.billing.plan]}
  - {name: rest, when: {}, owner: desk}
"""
    assert tuple(referenced_fields(ruleset_with(tmp_path, sources, rules))) == ("owners", "billing", "crm")
    assert tuple(referenced_fields(load_rules(Path(__file__).resolve().parents[2] / "rules"))) == ("crm",)


def test_only_the_fields_rules_read_are_referenced(tmp_path: Path) -> None:
    rules = """
rules:
  - {name: a, when: {lookup.crm.tier: gold}, owner: {from: lookup.crm.manager, fallback: desk}, context: [lookup.billing.plan]}
  - {name: b, when: {model: churn}, owner: desk, context: [lookup.crm.tier, lookup.billing.meta.region, lookup.billing.plan]}
  - {name: rest, when: {}, owner: desk}
"""
    assert referenced_fields(ruleset_with(tmp_path, CRM + BILLING, rules)) == {
        "crm": ("tier", "manager"), "billing": ("plan", "meta")}  # of lookup.billing.meta.region, its field


def test_jsonable_and_redact() -> None:
    assert jsonable(Decimal("1250.50")) == 1250.5 and jsonable(Decimal("3")) == 3 and isinstance(jsonable(Decimal("3")), int)
    assert jsonable(Decimal("NaN")) == "NaN" and jsonable(float("inf")) == "inf"
    assert jsonable(date(2026, 11, 2)) == "2026-11-02"
    assert jsonable(datetime(2026, 11, 2, 9, 30, tzinfo=UTC)) == "2026-11-02T09:30:00+00:00"
    assert jsonable({"a": [Decimal("1.5"), b"x"]}) == {"a": [1.5, "x"]}
    assert jsonable(True) is True and jsonable(None) is None and jsonable("7") == "7"
    assert redact("failed at postgresql+psycopg://bob:s3cret@db:5432/x, retry") == (
        "failed at postgresql+psycopg://bob:***@db:5432/x, retry"
    )


# Redis hashes (fakeredis) ------------------------------------------------------------------


async def test_redis_hash_fields_are_text_per_prediction_with_one_pipelined_read_per_key(tmp_path: Path, fake: Redis) -> None:
    rules = "\nrules:\n  - {name: a, when: {lookup.crm.tier: gold}, owner: desk, continue: true," \
            " context: [lookup.crm.health_score, lookup.crm.note]}\n  - {name: rest, when: {}, owner: desk}\n"
    ruleset = ruleset_with(tmp_path, CRM, rules)
    # `history` is read by no rule: never fetched, nor stored with the predictions.
    await fake.hset("t:context:account:acct-1", mapping={"tier": "gold", "health_score": 42, "note": "é", "history": "x" * 500})
    sent: list[list[tuple[Any, ...]]] = []
    original = fake.pipeline

    def spy(*args: Any, **kwargs: Any) -> Any:
        pipe = original(*args, **kwargs)
        execute = pipe.execute

        async def recorded(**options: Any) -> Any:
            sent.append([command for command, _ in pipe.command_stack])
            return await execute(**options)

        pipe.execute = recorded
        return pipe

    fake.pipeline = spy  # type: ignore[method-assign]
    enricher = ContextEnricher(ruleset, redis=fake, keys=Keys("t:"))
    batch = [prediction("p1", "acct-1"), prediction("p2", "acct-1"), prediction("p3", "acct-3")]
    found = await enricher.lookup(batch)
    assert found == {
        "p1": {"crm": {"tier": "gold", "health_score": "42", "note": "é"}},  # numbers stay strings
        "p2": {"crm": {"tier": "gold", "health_score": "42", "note": "é"}},
        "p3": {"crm": {}},  # no hash: no fields
    }
    fields = ("tier", "health_score", "note")
    assert sent == [[("HMGET", "t:context:account:acct-1", *fields), ("HMGET", "t:context:account:acct-3", *fields)]]
    assert enricher.failures == {}


async def test_a_key_that_is_not_a_hash_fails_only_its_predictions_and_warns_once(tmp_path: Path, fake: Redis) -> None:
    enricher = ContextEnricher(ruleset_with(tmp_path, CRM), redis=fake)
    await fake.hset("context:account:acct-1", "tier", "gold")
    await fake.set("context:account:acct-2", "not a hash")
    await fake.set("context:account:acct-3", "not a hash either")
    with capture_logs() as logs:
        found = await enricher.lookup([prediction("p1", "acct-1"), prediction("p2", "acct-2"), prediction("p3", "acct-3")])
    assert found == {"p1": {"crm": {"tier": "gold"}}}
    (warning,) = warnings_of(logs)
    assert (warning["source"], warning["kind"], warning["predictions"], warning["failures"]) == ("crm", "redis_hash", 3, 1)
    assert warning["error"].startswith("2 of 3 keys failed, first context:account:acct-2: WRONGTYPE")
    assert enricher.failures == {"crm": 1}


async def test_unreachable_redis_yields_no_fields_and_is_counted(tmp_path: Path) -> None:
    client = Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))  # fail at once, no retries
    enricher = ContextEnricher(ruleset_with(tmp_path, CRM), redis=client)
    try:
        with capture_logs() as logs:
            assert await enricher.lookup([prediction("p1")]) == {}
            assert await enricher.lookup([prediction("p2")]) == {}
    finally:
        await client.aclose()
    assert [w["error"].split(":")[0] for w in warnings_of(logs)] == ["ConnectionError", "ConnectionError"]
    assert enricher.failures == {"crm": 2}


async def test_redis_that_does_not_answer_times_out_within_the_source_timeout(tmp_path: Path) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # accept the command, never reply
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Redis(host="127.0.0.1", port=port)
    sources = '  crm: {redis_hash: "context:{entity_type}:{entity_id}", timeout_s: 0.2}\n'
    enricher = ContextEnricher(ruleset_with(tmp_path, sources), redis=client)
    try:
        with capture_logs() as logs:
            started = time.monotonic()
            assert await enricher.lookup([prediction("p1")]) == {}
            elapsed = time.monotonic() - started
    finally:
        await client.aclose()
        server.close()
    assert 0.2 <= elapsed < 1.5
    assert [(w["source"], w["error"]) for w in warnings_of(logs)] == [("crm", "timed out after 0.2s")]
    assert enricher.failures == {"crm": 1}


async def test_no_used_source_means_no_lookup_at_all(tmp_path: Path) -> None:
    rules = "\nrules:\n  - {name: rest, when: {}, owner: desk}\n"
    enricher = ContextEnricher(ruleset_with(tmp_path, CRM, rules), redis=None)  # a lookup would fail: no client
    assert enricher.sources() == ()
    assert await enricher.lookup([prediction("p1")]) == {}
    assert enricher.failures == {}


async def test_the_current_rule_set_is_read_on_every_batch(tmp_path: Path, fake: Redis) -> None:
    await fake.hset("context:account:acct-1", "tier", "gold")
    await fake.hset("other:acct-1", "tier", "silver")
    current = {"ruleset": ruleset_with(tmp_path, CRM)}
    enricher = build_enricher(lambda: current["ruleset"], redis=fake)
    assert await enricher.lookup([prediction("p1", "acct-1")]) == {"p1": {"crm": {"tier": "gold"}}}
    current["ruleset"] = ruleset_with(tmp_path, '  crm: {redis_hash: "other:{entity_id}"}\n', name="v2")
    assert await enricher.lookup([prediction("p1", "acct-1")]) == {"p1": {"crm": {"tier": "silver"}}}



def counted(metric: str, source: str) -> float:
    return metrics.REGISTRY.get_sample_value(f"decision_router_context_lookup_{metric}_total", {"source": source}) or 0.0


async def test_failed_and_oversized_lookups_are_counted_in_the_metrics_by_source(tmp_path: Path, fake: Redis) -> None:
    # Only in the logs, a context source down for hours showed nowhere an operator alerts on.
    sources = '  crm_m: {redis_hash: "context:{entity_type}:{entity_id}"}\n  down_m: {redis_hash: "down:{entity_id}"}\n'
    rules = "\nrules:\n  - {name: a, when: {}, owner: desk, context: [lookup.crm_m.note, lookup.down_m.tier]}\n"
    client = Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))  # fails at once
    before = {(m, s): counted(m, s) for m in ("failures", "oversized") for s in ("crm_m", "down_m")}
    enricher = ContextEnricher(ruleset_with(tmp_path, sources, rules), redis=fake)
    await fake.hset("context:account:acct-1", "note", BIG_NOTE)
    await enricher.lookup([prediction("p1", "acct-1")])
    enricher.redis = client
    try:
        await enricher.lookup([prediction("p2", "acct-1")])
        await enricher.lookup([prediction("p3", "acct-1")])
    finally:
        await client.aclose()
    after = {key: counted(*key) - value for key, value in before.items()}
    assert after == {("failures", "crm_m"): 2, ("failures", "down_m"): 2, ("oversized", "crm_m"): 1, ("oversized", "down_m"): 0}


# sizes and depth --------------------------------------------------------------------------

BIG_NOTE = "n" * 70 * 1024  # the sweep's 70 KB CRM field: over the 16 KiB a source may give a prediction
NOTE_RULES = "\nrules:\n  - {name: a, when: {lookup.crm.tier: gold}, owner: desk, continue: true," \
             " context: [lookup.crm.note]}\n  - {name: rest, when: {}, owner: desk}\n"


async def test_an_over_long_value_is_missing_and_warned_of_once_per_batch_without_the_value(
    tmp_path: Path, fake: Redis
) -> None:
    enricher = ContextEnricher(ruleset_with(tmp_path, CRM, NOTE_RULES), redis=fake)
    await fake.hset("context:account:acct-1", mapping={"tier": "gold", "note": BIG_NOTE})
    await fake.hset("context:account:acct-2", mapping={"tier": "gold", "note": "renewal call booked"})
    with capture_logs() as logs:
        found = await enricher.lookup([prediction("p1", "acct-1"), prediction("p2", "acct-1"), prediction("p3", "acct-2")])
    assert found == {
        "p1": {"crm": {"tier": "gold"}},  # the note is missing, the rest as usual
        "p2": {"crm": {"tier": "gold"}},
        "p3": {"crm": {"tier": "gold", "note": "renewal call booked"}},
    }
    (warning,) = warnings_of(logs)
    assert (warning["source"], warning["kind"], warning["predictions"], warning["dropped"]) == (
        "crm", "redis_hash", 2, [f"note: {len(BIG_NOTE)} bytes"])
    assert (warning["max_bytes"], warning["max_depth"]) == (16 * 1024, 7)  # from the default payload limits
    assert "nnnnnnnn" not in str(logs)
    assert (enricher.oversized, enricher.failures) == ({"crm": 1}, {})


async def test_fields_over_the_limit_together_are_all_missing_for_that_prediction(tmp_path: Path, fake: Redis) -> None:
    rules = "\nrules:\n  - {name: a, when: {}, owner: desk, context: [lookup.crm.a, lookup.crm.b, lookup.crm.c]}\n"
    # DECISION_ROUTER_MAX_PAYLOAD_BYTES=4096: a source may give a prediction 1024 bytes.
    enricher = ContextEnricher(ruleset_with(tmp_path, CRM, rules), redis=fake, limits=PayloadLimits(max_bytes=4096))
    await fake.hset("context:account:acct-1", mapping={"a": "x" * 400, "b": "y" * 400, "c": "z" * 400})
    await fake.hset("context:account:acct-2", mapping={"a": "x" * 400, "b": "y" * 400})
    with capture_logs() as logs:
        found = await enricher.lookup([prediction("p1", "acct-1"), prediction("p2", "acct-2")])
    assert found == {"p1": {"crm": {}}, "p2": {"crm": {"a": "x" * 400, "b": "y" * 400}}}
    (warning,) = warnings_of(logs)
    assert (warning["predictions"], warning["dropped"], warning["max_bytes"]) == (1, ["a, b, c together: 1203 bytes"], 1024)


def test_values_nested_too_deep_or_too_long_are_dropped_by_name_and_size() -> None:
    limits = LookupLimits(max_bytes=100, max_depth=3)
    deep: Any = {"a": [{"b": 1}]}  # 3 levels: the most
    deeper: Any = {"a": [{"b": [1]}]}
    assert bounded({"ok": deep, "deep": deeper, "long": "é" * 51, "n": 7}, limits) == (
        {"ok": deep, "n": 7}, ["deep: nested more than 3 levels", "long: 102 bytes"])
    assert bounded({"s": "x" * 99}, limits) == ({"s": "x" * 99}, [])  # name and value: the limit itself is within it
    assert bounded({"s": "x" * 100}, limits) == ({}, ["s together: 101 bytes"])


def test_text_no_store_can_hold_is_dropped_by_name_and_size() -> None:
    limits = LookupLimits(max_bytes=100, max_depth=3)
    fields = {"nul": "4\x002", "raw": b"\xff\xfe", "raw_nul": b"a\x00", "key": {"a\x00": 1}, "item": ["ok", "\ud800"],
              "ok": b"\xc3\xa9", "sqlite": NotUtf8(b"\xff")}
    assert bounded(fields, limits) == ({"ok": b"\xc3\xa9"}, [
        "nul: 3 bytes holding a NUL character or text that is not UTF-8",
        "raw: 2 bytes holding a NUL character or text that is not UTF-8",
        "raw_nul: 2 bytes holding a NUL character or text that is not UTF-8",
        "key: 13 bytes holding a NUL character or text that is not UTF-8",
        "item: 16 bytes holding a NUL character or text that is not UTF-8",
        "sqlite: 1 bytes holding a NUL character or text that is not UTF-8",
    ])


async def test_a_redis_value_with_a_nul_or_not_utf8_is_missing_warned_of_and_counted(tmp_path: Path, fake: Redis) -> None:
    # The gate refuses NUL in a prediction (no store can hold it); looked up, "4\x002" was routed on and stored,
    # and bytes that are not UTF-8 became U+FFFD.
    rules = "\nrules:\n  - {name: a, when: {}, owner: desk, context: [lookup.crm_t.tier, lookup.crm_t.note]}\n"
    sources = '  crm_t: {redis_hash: "context:{entity_type}:{entity_id}"}\n'
    enricher = ContextEnricher(ruleset_with(tmp_path, sources, rules), redis=fake)
    await fake.hset("context:account:acct-1", mapping={"tier": "4\x002", "note": "fine"})
    await fake.hset("context:account:acct-2", mapping={"tier": b"\xffgold", "note": "fine"})
    await fake.hset("context:account:acct-3", mapping={"tier": "gold", "note": "fine"})
    before = counted("oversized", "crm_t")
    with capture_logs() as logs:
        found = await enricher.lookup([prediction("p1", "acct-1"), prediction("p2", "acct-2"), prediction("p3", "acct-3")])
    assert found == {"p1": {"crm_t": {"note": "fine"}}, "p2": {"crm_t": {"note": "fine"}},
                     "p3": {"crm_t": {"tier": "gold", "note": "fine"}}}
    (warning,) = warnings_of(logs)
    assert (warning["source"], warning["predictions"], warning["dropped"]) == ("crm_t", 2, [
        "tier: 3 bytes holding a NUL character or text that is not UTF-8",
        "tier: 5 bytes holding a NUL character or text that is not UTF-8"])
    assert "gold" not in str(warning) and "\x00" not in str(logs)
    assert (enricher.oversized, enricher.failures) == ({"crm_t": 1}, {})
    assert counted("oversized", "crm_t") - before == 1


async def test_sqlite_text_with_a_nul_or_not_utf8_loses_only_that_value(tmp_path: Path, sqlite: Engine) -> None:
    # sqlite3 raised OperationalError "Could not decode to UTF-8 column" on the bad text: the whole batch
    # lost the source.
    with sqlite.begin() as connection:
        connection.exec_driver_sql("insert into billing_accounts values ('acct-7', 1, cast(x'ff70726f' as text)),"
                                   " ('acct-8', 2, 'pro' || char(0) || 'x')")
    enricher = ContextEnricher(ruleset_with(tmp_path, BILLING), engine=sqlite)
    with capture_logs() as logs:
        found = await enricher.lookup([prediction("p1", "acct-1"), prediction("p7", "acct-7"), prediction("p8", "acct-8")])
    assert found == {"p1": {"billing": {"overdue_amount": 1250.5, "plan": "pro"}},
                     "p7": {"billing": {"overdue_amount": 1.0}}, "p8": {"billing": {"overdue_amount": 2.0}}}
    (warning,) = warnings_of(logs)
    assert (warning["source"], warning["kind"], warning["predictions"], warning["dropped"]) == ("billing", "sql", 2, [
        "plan: 4 bytes holding a NUL character or text that is not UTF-8",
        "plan: 5 bytes holding a NUL character or text that is not UTF-8"])
    assert enricher.failures == {}
    with sqlite.connect() as connection:  # the pooled connection decodes text as before
        with pytest.raises(sqlalchemy.exc.OperationalError, match="Could not decode to UTF-8"):
            connection.exec_driver_sql("select plan from billing_accounts where account_id = 'acct-7'").all()


# SQL (SQLite) ------------------------------------------------------------------------------


async def test_sql_first_row_per_distinct_entity(tmp_path: Path, sqlite: Engine) -> None:
    enricher = ContextEnricher(ruleset_with(tmp_path, BILLING), engine=sqlite)
    queries = count_queries(sqlite, "billing_accounts")
    batch = [prediction("p1", "acct-1"), prediction("p2", "acct-1"), prediction("p3", "acct-2"), prediction("p4", "acct-9")]
    found = await enricher.lookup(batch)
    assert found == {
        "p1": {"billing": {"overdue_amount": 1250.5, "plan": "pro"}},
        "p2": {"billing": {"overdue_amount": 1250.5, "plan": "pro"}},
        "p3": {"billing": {"overdue_amount": 0.0, "plan": "basic"}},
        "p4": {"billing": {}},  # no row
    }
    assert queries == [("acct-1",), ("acct-2",), ("acct-9",)]  # one query per entity, not per prediction
    assert enricher.failures == {}
    with sqlite.begin() as connection:  # the pooled connection is writable again afterwards
        connection.exec_driver_sql("insert into billing_accounts values ('acct-3', 1, 'pro')")


async def test_sql_keeps_only_the_columns_rules_read_within_the_limits(tmp_path: Path, sqlite: Engine) -> None:
    note = "replace(hex(zeroblob(10000)), '00', 'ab')"  # 20,000 characters
    sources = f'  billing: {{sql: "select *, {note} as note, 1 as unread from billing_accounts where account_id = :entity_id"}}\n'
    rules = "\nrules:\n  - {name: a, when: {}, owner: desk, context: [lookup.billing.plan, lookup.billing.note]}\n"
    enricher = ContextEnricher(ruleset_with(tmp_path, sources, rules), engine=sqlite)
    with capture_logs() as logs:
        found = await enricher.lookup([prediction("p1", "acct-1")])
    assert found == {"p1": {"billing": {"plan": "pro"}}}  # not account_id, overdue_amount or unread; the note too long
    assert [(w["source"], w["kind"], w["dropped"]) for w in warnings_of(logs)] == [("billing", "sql", ["note: 20000 bytes"])]


async def test_sql_error_yields_no_fields_and_warns_once_per_batch(tmp_path: Path, sqlite: Engine) -> None:
    sources = '  billing: {sql: "select plan from missing_table where account_id = :entity_id"}\n'
    enricher = ContextEnricher(ruleset_with(tmp_path, sources), engine=sqlite)
    with capture_logs() as logs:
        assert await enricher.lookup([prediction("p1", "acct-1"), prediction("p2", "acct-2")]) == {}
    (warning,) = warnings_of(logs)
    assert (warning["source"], warning["kind"], warning["predictions"]) == ("billing", "sql", 2)
    assert warning["error"] == "OperationalError: no such table: missing_table"
    assert enricher.failures == {"billing": 1}


async def test_slow_sql_times_out_and_the_query_is_interrupted(tmp_path: Path, sqlite: Engine) -> None:
    with sqlite.begin() as connection:
        connection.exec_driver_sql("create table n (i integer)")
        connection.exec_driver_sql("insert into n (i) " + " union all ".join(f"select {i}" for i in range(400)))
    slow = "select count(*) as rows from n a, n b, n c, n d where a.i <> :entity_id"  # 400^4 rows
    sources = f'  billing: {{sql: "{slow}", timeout_s: 0.3}}\n'
    enricher = ContextEnricher(ruleset_with(tmp_path, sources), engine=sqlite)
    with capture_logs() as logs:
        started = time.monotonic()
        assert await enricher.lookup([prediction("p1")]) == {}
        assert time.monotonic() - started < 1.5
    assert [w["error"] for w in warnings_of(logs)] == ["timed out after 0.3s"]
    # The worker thread cannot be cancelled, but its query is interrupted at the deadline:
    # the connection is back in the pool promptly and writable again.
    deadline = time.monotonic() + 3
    while sqlite.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        await asyncio.sleep(0.02)
    assert sqlite.pool.checkedout() == 0  # type: ignore[attr-defined]
    with sqlite.connect() as connection:
        assert connection.exec_driver_sql("pragma query_only").scalar() == 0


async def test_a_database_that_never_answers_holds_none_of_the_threads_the_router_writes_on(tmp_path: Path) -> None:
    # A PostgreSQL that accepts connections and never answers: each lookup's connect waits out its
    # connect_timeout (30 s here) in a thread, long after the source's timeout_s.
    hung: list[asyncio.StreamWriter] = []

    async def accept_and_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)
        await reader.read(-1)

    server = await asyncio.start_server(accept_and_hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sources = '  billing: {sql: "select plan from b where account_id = :entity_id", database_url_env: CTX_URL, timeout_s: 0.2}\n'
    environ = {"CTX_URL": f"postgresql+psycopg://u@127.0.0.1:{port}/x?connect_timeout=30"}
    enricher = ContextEnricher(ruleset_with(tmp_path, sources), environ=environ)
    loop_threads = min(32, (os.cpu_count() or 1) + 4)  # the size of asyncio's default executor
    try:
        with capture_logs() as logs:
            for n in range(loop_threads + 2):  # a batch after another, each giving up at its timeout
                assert await enricher.lookup([prediction(f"p{n}")]) == {}
        assert [w["error"] for w in warnings_of(logs)] == ["timed out after 0.2s"] * (loop_threads + 2)
        # The pipeline writes the store on the loop's default threads: none is waiting on the hung database.
        await asyncio.wait_for(asyncio.to_thread(lambda: None), timeout=10)
        assert len(hung) <= SQL_THREADS  # lookups queued behind hung connects were dropped, not connected later
    finally:
        enricher.close()
        for writer in hung:  # the hung connects fail at once, freeing their threads
            writer.close()
        server.close()


HUNG_SOURCE = '  billing: {sql: "select plan from b where account_id = :entity_id", database_url_env: CTX_URL, timeout_s: %s}\n'


@pytest.mark.parametrize(
    ("timeout_s", "query", "connect_timeout"),
    [("0.2", "", 2), ("2.5", "", 3), ("7", "", 7), ("0.2", "?connect_timeout=30", "30")],
    ids=["at-least-2", "whole-seconds", "as-the-source", "the-urls-own"],
)
def test_a_context_databases_connect_timeout_follows_the_source_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timeout_s: str, query: str, connect_timeout: int | str
) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "60")  # the store's setting, not the source's
    ruleset = ruleset_with(tmp_path, HUNG_SOURCE % timeout_s)
    enricher = ContextEnricher(ruleset, environ={"CTX_URL": f"postgresql://u@127.0.0.1:1/x{query}"})
    engine = enricher._engine_for(ruleset.context_sources["billing"])
    seen: list[dict[str, Any]] = []

    @event.listens_for(engine, "do_connect")
    def capture(dialect, record, cargs, cparams) -> None:  # noqa: ANN001
        seen.append(cparams)
        raise ConnectionAbortedError("not connecting")

    try:
        with pytest.raises(ConnectionAbortedError):
            engine.connect()
    finally:
        enricher.close()
    assert seen[0]["connect_timeout"] == connect_timeout


async def test_a_hung_context_database_holds_its_lookup_thread_no_longer_than_the_bound(
    tmp_path: Path, silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `serve` exits once the lookup threads have ended: a connect to a database that hangs must give up
    # after max(2, timeout_s) seconds, not store.CONNECT_TIMEOUT_S (10 s), which this cannot beat.
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    environ = {"CTX_URL": f"postgresql+psycopg://u@127.0.0.1:{silent_server}/x"}
    enricher = ContextEnricher(ruleset_with(tmp_path, HUNG_SOURCE % "0.2"), environ=environ)
    started = time.monotonic()
    with capture_logs() as logs:
        assert await enricher.lookup([prediction("p1")]) == {}
    assert [w["error"] for w in warnings_of(logs)] == ["timed out after 0.2s"]
    enricher.close()  # as the service does on stopping: then the interpreter waits for these threads
    for thread in [t for t in threading.enumerate() if t.name.startswith("context-sql")]:
        await asyncio.to_thread(thread.join, 60)
    assert time.monotonic() - started < 8


async def test_sql_source_on_its_own_database_from_an_environment_variable(tmp_path: Path, sqlite: Engine) -> None:
    sources = '  billing: {sql: "select plan from billing_accounts where account_id = :entity_id", database_url_env: CTX_URL}\n'
    ruleset = ruleset_with(tmp_path, sources)
    environ = {"CTX_URL": f"sqlite:///{tmp_path / 'context.db'}"}
    enricher = ContextEnricher(ruleset, engine=None, environ=environ)  # not the service's store
    assert await enricher.lookup([prediction("p1", "acct-2")]) == {"p1": {"billing": {"plan": "basic"}}}
    assert len(enricher._engines) == 1
    enricher.close()
    assert enricher._engines == {}


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        ({}, "SourceError: environment variable CTX_URL is not set"),
        ({"CTX_URL": "mysql://bob:s3cret@db/x"},
         "SourceError: CTX_URL is mysql://bob:***@db/x: expected a sqlite:/// or postgresql+psycopg:// URL"),
    ],
    ids=["unset", "unsupported-and-redacted"],
)
async def test_unusable_database_setting_is_a_failure_not_a_crash(tmp_path: Path, environ: dict[str, str], error: str) -> None:
    sources = '  billing: {sql: "select plan from billing_accounts where account_id = :entity_id", database_url_env: CTX_URL}\n'
    enricher = ContextEnricher(ruleset_with(tmp_path, sources), environ=environ)
    with capture_logs() as logs:
        assert await enricher.lookup([prediction("p1")]) == {}
    assert [w["error"] for w in warnings_of(logs)] == [error]
    assert "s3cret" not in str(logs)


async def test_one_failing_source_does_not_take_the_others_down(tmp_path: Path, fake: Redis, sqlite: Engine) -> None:
    await fake.hset("context:account:acct-1", "tier", "gold")
    sources = CRM + '  billing: {sql: "select plan from nowhere where account_id = :entity_id"}\n'
    enricher = ContextEnricher(ruleset_with(tmp_path, sources), redis=fake, engine=sqlite)
    with capture_logs() as logs:
        assert await enricher.lookup([prediction("p1", "acct-1")]) == {"p1": {"crm": {"tier": "gold"}}}
    assert [w["source"] for w in warnings_of(logs)] == ["billing"]
    assert enricher.failures == {"billing": 1}


def test_sql_connection_is_read_only(tmp_path: Path, sqlite: Engine) -> None:
    # A statement that passed the load check cannot write either: the transaction is read-only.
    with pytest.raises(sqlalchemy.exc.OperationalError, match="readonly"):
        run_queries(sqlite, "insert into billing_accounts values (:entity_id, 0, 'x')", [(("entity_id", "acct-7"),)],
                    time.monotonic() + 5)
    with sqlite.connect() as connection:
        assert connection.exec_driver_sql("select count(*) from billing_accounts").scalar() == 2
        assert connection.exec_driver_sql("pragma query_only").scalar() == 0


async def test_a_context_database_url_is_checked_as_the_stores_is(tmp_path: Path) -> None:
    # An SQLite option SQLite would ignore (no uri=true) printed SQLAlchemy's warning into the log at each
    # batch and opened the file for writing; it is now the source's error, named by its variable.
    sources = '  billing: {sql: "select plan from b where account_id = :entity_id", database_url_env: CTX_URL}\n'
    environ = {"CTX_URL": f"sqlite:///{tmp_path / 'context.db'}?mode=ro"}
    enricher = ContextEnricher(ruleset_with(tmp_path, sources), environ=environ)
    try:
        with capture_logs() as logs:
            assert await enricher.lookup([prediction("p1")]) == {}
    finally:
        enricher.close()
    (warning,) = warnings_of(logs)
    assert warning["error"].startswith("SourceError: CTX_URL: SQLite reads mode only with uri=true and a file: name")
    assert not (tmp_path / "context.db").exists()
