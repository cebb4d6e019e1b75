"""Context enrichment end to end on real Redis and both stores: Redis hashes and a SQL table
looked up at routing time, surfaced on alerts or listed as missing, used in conditions;
sources that fail or time out never fail routing; hot reload of context_sources."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session
from structlog.testing import capture_logs

from decision_router.contracts import Alert, Prediction
from decision_router.enrich import ContextEnricher, run_queries
from decision_router.keys import Keys
from decision_router.replay import replay_store
from decision_router.router import in_holdout
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.tables import AlertRecord, PredictionRecord
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.redis

OWNERS = """
owners:
  - {id: am, name: Account Manager}
  - {id: gold-desk, name: Gold Desk}
  - {id: desk, name: Desk}
"""
SOURCES = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
  billing: {sql: "select overdue_amount, plan from billing_accounts where account_id = :entity_id", timeout_s: 2}
"""
RULES = """
rules:
  - name: gold-accounts
    when: {model: churn, lookup.crm.tier: gold}
    owner: gold-desk
    context: [lookup.crm.health_score]
  - name: churn
    when: {model: churn}
    owner: am
    context: [context.arr, lookup.crm.health_score, lookup.crm.last_contact, lookup.billing.overdue_amount, lookup.billing.plan]
  - {name: rest, when: {}, owner: desk, action: record}
"""
ALL_LOOKUPS = ["lookup.crm.health_score", "lookup.crm.last_contact", "lookup.billing.overdue_amount", "lookup.billing.plan"]


def rules_dir(tmp_path: Path, routing: str) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir(exist_ok=True)
    (directory / "routing.yaml").write_text(routing)
    (directory / "owners.yaml").write_text(OWNERS)
    return directory


def create_billing(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "create table billing_accounts (account_id varchar(64) primary key, overdue_amount numeric(12, 2), plan varchar(32))"
        )
        connection.exec_driver_sql(
            "insert into billing_accounts values ('acct-1', 1250.50, 'pro'), ('acct-3', 0, 'basic')"
        )


def document(pid: str, entity_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "prediction_id": pid, "model": "churn", "model_version": "2026.11", "entity_type": "account",
        "entity_id": entity_id, "score": 0.9,
        "predicted_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "context": {"arr": 120000}, **overrides,
    }


def publish(r, keys: Keys, *documents: dict[str, Any]) -> None:
    for doc in documents:
        r.xadd(keys.predictions, {"data": json.dumps(doc)})


def inbox(r, keys: Keys, owner: str) -> dict[str, Alert]:
    alerts = [Alert.model_validate_json(fields["data"]) for _, fields in r.xrange(keys.inbox(owner))]
    return {a.prediction_id: a for a in alerts}


def stored(engine: Engine, prediction_id: str) -> AlertRecord:
    with Session(engine) as session:
        return session.scalars(select(AlertRecord).where(AlertRecord.prediction_id == prediction_id)).one()


@pytest.fixture
def with_billing(engine: Engine) -> Engine:
    create_billing(engine)
    return engine


async def test_looked_up_context_is_on_the_alert_or_listed_as_missing(settings, with_billing, r, tmp_path) -> None:
    engine = with_billing
    keys = Keys(settings.stream_prefix)
    r.hset(f"{settings.stream_prefix}context:account:acct-1",
           mapping={"tier": "silver", "health_score": "42", "last_contact": "2026-11-02"})
    r.hset(f"{settings.stream_prefix}context:account:acct-3", mapping={"tier": "gold", "health_score": "17"})
    r.hset("context:account:acct-2", "health_score", "99")  # not under this service's prefix: never read
    try:
        ruleset = load_rules(rules_dir(tmp_path, SOURCES + RULES))
        async with running_service(settings, ruleset, engine) as service:
            publish(r, keys, document("p1", "acct-1"), document("p2", "acct-2"), document("p3", "acct-3"))
            await wait_until(lambda: len(inbox(r, keys, "am")) == 2 and len(inbox(r, keys, "gold-desk")) == 1,
                             what="three alerts")
            enricher = service.pipeline.enricher
            assert isinstance(enricher, ContextEnricher) and enricher.failures == {}
    finally:
        r.delete("context:account:acct-2")

    am, gold = inbox(r, keys, "am"), inbox(r, keys, "gold-desk")
    # Both sources answered: every field is on the alert, with the type its source gives.
    assert am["p1"].rule == "churn"  # tier silver: not the gold rule
    assert am["p1"].context == {
        "context.arr": 120000, "lookup.crm.health_score": "42", "lookup.crm.last_contact": "2026-11-02",
        "lookup.billing.overdue_amount": 1250.5, "lookup.billing.plan": "pro",
    }
    assert am["p1"].missing_context == []
    # No hash, no row: the fields are listed as missing, and the alert goes out all the same.
    assert am["p2"].context == {"context.arr": 120000}
    assert am["p2"].missing_context == ALL_LOOKUPS
    assert stored(engine, "p2").missing_context == ALL_LOOKUPS
    # A condition on looked-up context routes differently.
    assert (gold["p3"].rule, gold["p3"].context, gold["p3"].missing_context) == (
        "gold-accounts", {"lookup.crm.health_score": "17"}, [])
    assert "p3" not in am
    # What was looked up is stored with the prediction, so replaying the window with the same
    # rules decides the same (the gold rule included) and finds nothing missing.
    with Session(engine) as session:
        assert session.get(PredictionRecord, "p1").document["lookup"] == {
            "crm": {"tier": "silver", "health_score": "42", "last_contact": "2026-11-02"},
            "billing": {"overdue_amount": 1250.5, "plan": "pro"}}
        assert session.get(PredictionRecord, "p2").document["lookup"] == {"crm": {}, "billing": {}}
        report = replay_store(session, ruleset, since=None, until=None)
    assert (report.replayed, report.unchanged, report.missing_lookups) == (3, 3, {})


async def test_an_over_long_value_is_missing_on_the_alert_and_only_read_fields_are_stored(settings, with_billing, r, tmp_path) -> None:
    # The sweep's case: a 70 KB CRM field, over the 16 KiB a source may give a prediction (a quarter
    # of DECISION_ROUTER_MAX_PAYLOAD_BYTES), went onto the alert and, with every other field of the
    # hash, into each prediction's stored document.
    engine = with_billing
    keys = Keys(settings.stream_prefix)
    routing = SOURCES + RULES.replace("lookup.crm.last_contact", "lookup.crm.notes")
    r.hset(f"{settings.stream_prefix}context:account:acct-1",
           mapping={"tier": "silver", "health_score": "42", "notes": "n" * 70 * 1024, "history": "h" * 4096})
    ruleset = load_rules(rules_dir(tmp_path, routing))
    with capture_logs() as logs:
        async with running_service(settings, ruleset, engine):
            publish(r, keys, document("p1", "acct-1"))
            await wait_until(lambda: "p1" in inbox(r, keys, "am"), what="the alert")
    alert = inbox(r, keys, "am")["p1"]
    assert alert.context == {"context.arr": 120000, "lookup.crm.health_score": "42",
                             "lookup.billing.overdue_amount": 1250.5, "lookup.billing.plan": "pro"}
    assert alert.missing_context == ["lookup.crm.notes"]
    assert stored(engine, "p1").missing_context == alert.missing_context
    (warning,) = [e for e in logs if e.get("event", "").startswith("looked-up context over the limits")]
    assert (warning["source"], warning["predictions"], warning["dropped"]) == ("crm", 1, [f"notes: {70 * 1024} bytes"])
    assert "nnnnnnnn" not in json.dumps(logs, default=str)
    with Session(engine) as session:
        # Only what the rules read (not `history`), within the limits; replay routes it the same.
        assert session.get(PredictionRecord, "p1").document["lookup"]["crm"] == {"tier": "silver", "health_score": "42"}
        report = replay_store(session, ruleset, since=None, until=None)
    assert (report.replayed, report.unchanged, report.missing_lookups) == (1, 1, {})


async def test_failing_and_slow_sources_leave_fields_missing_but_never_fail_routing(settings, engine, r, tmp_path) -> None:
    keys = Keys(settings.stream_prefix)
    with engine.begin() as connection:
        connection.exec_driver_sql("create table n (i integer)")
        connection.exec_driver_sql("insert into n (i) " + " union all ".join(f"select {i}" for i in range(400)))
    routing = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
  broken: {sql: "select plan from no_such_table where account_id = :entity_id"}
  slow: {sql: "select count(*) as rows from n a, n b, n c, n d where a.i <> length(:entity_id)", timeout_s: 0.3}
  remote: {sql: "select 1 as one where :entity_id <> ''", database_url_env: DECISION_ROUTER_CONTEXT_DB_URL}
rules:
  - name: churn
    when: {model: churn}
    owner: am
    context: [lookup.crm.tier, lookup.broken.plan, lookup.slow.rows, lookup.remote.one]
  - {name: rest, when: {}, owner: desk, action: record}
"""
    r.hset(f"{settings.stream_prefix}context:account:acct-1", "tier", "gold")
    r.set(f"{settings.stream_prefix}context:account:acct-2", "not a hash")  # WRONGTYPE for this key only
    # Published before the service starts, so usually read as one batch (the counts allow two).
    publish(r, keys, document("p1", "acct-1"), document("p2", "acct-2"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DECISION_ROUTER_CONTEXT_DB_URL", "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test")
        with capture_logs() as logs:
            # claim_idle: a batch held up by the slow source must not be reclaimed and looked up again.
            patient = settings.model_copy(update={"claim_idle": timedelta(seconds=60)})
            async with running_service(patient, load_rules(rules_dir(tmp_path, routing)), engine) as service:
                await wait_until(lambda: len(inbox(r, keys, "am")) == 2, what="both alerts despite failing sources")
                failures = dict(service.pipeline.enricher.failures)

    alerts = inbox(r, keys, "am")
    assert alerts["p1"].context == {"lookup.crm.tier": "gold"}
    assert alerts["p1"].missing_context == ["lookup.broken.plan", "lookup.slow.rows", "lookup.remote.one"]
    assert alerts["p2"].context == {}
    assert alerts["p2"].missing_context == ["lookup.crm.tier", "lookup.broken.plan", "lookup.slow.rows", "lookup.remote.one"]

    warnings = [e for e in logs if e.get("event", "").startswith("context lookup failed")]
    batches = failures["broken"]  # the predictions came in one batch or two
    assert batches >= 1 and failures == {"crm": 1, "broken": batches, "slow": batches, "remote": batches}
    by_source: dict[str, list[str]] = {}
    for w in warnings:
        by_source.setdefault(w["source"], []).append(w["error"])
    assert by_source["crm"] == [
        f"1 of {3 - batches} keys failed, first {settings.stream_prefix}context:account:acct-2: "
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    ]
    assert by_source["slow"] == ["timed out after 0.3s"] * batches
    assert all("no_such_table" in error for error in by_source["broken"]) and len(by_source["broken"]) == batches
    assert len(by_source["remote"]) == batches and "s3cret" not in json.dumps(logs, default=str)
    assert stored(engine, "p2").missing_context == alerts["p2"].missing_context
    # A failed source is absent from the stored `lookup`, as one never looked up (p2, every source failed, has
    # none at all, as a prediction whose routing read no lookup): replay cannot tell them apart and counts both.
    with Session(engine) as session:
        assert session.get(PredictionRecord, "p1").document["lookup"] == {"crm": {"tier": "gold"}}
        assert "lookup" not in session.get(PredictionRecord, "p2").document
        report = replay_store(session, load_rules(rules_dir(tmp_path, routing)), since=None, until=None)
    assert report.missing_lookups == {"broken": 2, "crm": 1, "remote": 2, "slow": 2}


async def test_hot_reload_swaps_context_sources(settings, engine, r, tmp_path) -> None:
    keys = Keys(settings.stream_prefix)
    plain = "rules:\n  - {name: churn, when: {model: churn}, owner: am, context: [context.arr]}\n" \
            "  - {name: rest, when: {}, owner: desk, action: record}\n"
    directory = rules_dir(tmp_path, plain)
    r.hset(f"{settings.stream_prefix}crm:acct-1", "tier", "gold")
    tuned = settings.model_copy(update={"rules_dir": directory, "rules_poll_interval": timedelta(hours=1)})
    async with running_service(tuned, load_rules(directory), engine, watch_rules=True) as service:
        publish(r, keys, document("p1", "acct-1"))
        await wait_until(lambda: "p1" in inbox(r, keys, "am"), what="first alert")
        (directory / "routing.yaml").write_text(
            'context_sources:\n  crm: {redis_hash: "crm:{entity_id}"}\n'
            + plain.replace("context: [context.arr]", "context: [context.arr, lookup.crm.tier]")
        )
        await service.check_rules(force=True)
        assert service.pipeline.enricher.sources()[0].key_pattern == "crm:{entity_id}"
        publish(r, keys, document("p2", "acct-1"))
        await wait_until(lambda: "p2" in inbox(r, keys, "am"), what="alert under the new rules")
    alerts = inbox(r, keys, "am")
    assert alerts["p1"].context == {"context.arr": 120000}
    assert alerts["p2"].context == {"context.arr": 120000, "lookup.crm.tier": "gold"}


async def test_shipped_rules_surface_crm_context_on_enterprise_watch_alerts(service, r) -> None:
    keys = service.keys
    # Entities outside the rule's 10% control group, so both alerts are delivered.
    known, unknown = [e for e in (f"acct-w{n}" for n in range(1000))
                      if not in_holdout("enterprise-churn-watch", "account", e, 0.1)][:2]
    r.hset(f"{keys.prefix}context:account:{known}", mapping={"health_score": "38", "last_contact": "2026-10-30"})
    manager = {"segment": "enterprise", "account_manager": "alice-moreau", "arr": 90000}
    publish(r, keys,
            document("w1", known, score=0.7, context={**manager, "renewal_date": "2027-03-01"},
                     features={"top_drivers": ["usage_drop"]}),
            document("w2", unknown, score=0.7, context=manager))
    await wait_until(lambda: {"w1", "w2"} <= set(inbox(r, keys, "alice-moreau")), what="enterprise-churn-watch alerts")
    alerts = inbox(r, keys, "alice-moreau")
    assert (alerts["w1"].rule, alerts["w2"].rule) == ("enterprise-churn-watch", "enterprise-churn-watch")
    assert alerts["w1"].context == {
        "context.arr": 90000, "context.renewal_date": "2027-03-01", "features.top_drivers": ["usage_drop"],
        "lookup.crm.health_score": "38", "lookup.crm.last_contact": "2026-10-30",
    }
    assert alerts["w1"].missing_context == []
    assert alerts["w2"].missing_context == [
        "context.renewal_date", "features.top_drivers", "lookup.crm.health_score", "lookup.crm.last_contact",
    ]


# Redis that answers late ------------------------------------------------------------------


class DelayingProxy:
    """A TCP proxy to Redis that can hold back the server's replies (a slow network)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.delay = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> DelayingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delayed: bool) -> None:
            try:
                while data := await source.read(65536):
                    if delayed and self.delay:
                        await asyncio.sleep(self.delay)
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        self._tasks += [asyncio.create_task(pump(reader, up_writer, False)), asyncio.create_task(pump(up_reader, writer, True))]


@pytest.fixture
async def proxy(redis_server: str) -> AsyncIterator[DelayingProxy]:
    host_port = redis_server.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    async with DelayingProxy(host, int(port)) as running:
        yield running


async def test_late_redis_times_out_and_the_next_batch_reads_its_own_replies(proxy, prefix, r, tmp_path) -> None:
    r.hset(f"{prefix}context:account:acct-1", "tier", "gold")
    r.hset(f"{prefix}context:account:acct-2", "tier", "silver")
    routing = 'context_sources:\n  crm: {redis_hash: "context:{entity_type}:{entity_id}", timeout_s: 0.3}\n' \
              "rules:\n  - {name: a, when: {}, owner: desk, context: [lookup.crm.tier]}\n"
    client = Redis(host="127.0.0.1", port=proxy.port)
    enricher = ContextEnricher(load_rules(rules_dir(tmp_path, routing)), redis=client, keys=Keys(prefix))

    def one(pid: str, entity_id: str) -> Prediction:
        return Prediction.model_validate(document(pid, entity_id))

    try:
        assert await enricher.lookup([one("p0", "acct-2")]) == {"p0": {"crm": {"tier": "silver"}}}
        proxy.delay = 0.8
        with capture_logs() as logs:
            assert await enricher.lookup([one("p1", "acct-1")]) == {}
        assert [(e["source"], e["error"]) for e in logs if e["log_level"] == "warning"] == [("crm", "timed out after 0.3s")]
        proxy.delay = 0.0
        await asyncio.sleep(1.0)  # the late reply to the timed-out read arrives meanwhile
        # A connection left with that reply unread would hand it to this batch: acct-1's hash for acct-2.
        assert await enricher.lookup([one("p2", "acct-2")]) == {"p2": {"crm": {"tier": "silver"}}}
        assert enricher.failures == {"crm": 1}
    finally:
        await client.aclose()


# PostgreSQL specifics ----------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_queries_run_read_only_and_are_cancelled_at_the_deadline(pg_engine: Engine) -> None:
    with pg_engine.begin() as connection:
        connection.exec_driver_sql("create sequence ticket")
    params = [(("entity_id", "acct-1"),)]
    # Passes the load check (a single SELECT) but would write: refused by the read-only transaction.
    with pytest.raises(DBAPIError, match="read-only transaction"):
        run_queries(pg_engine, "select nextval('ticket') as n where :entity_id <> ''", params, time.monotonic() + 5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        run_queries(pg_engine, "select pg_sleep(60) as slept where :entity_id <> ''", params, time.monotonic() + 0.3)
    # Cancelled by statement_timeout (about 0.3 s), not after the 60 s sleep; the margin is for a busy machine.
    assert time.monotonic() - started < 10
    with pg_engine.connect() as connection:  # the pooled connection is not left read-only or limited
        assert connection.exec_driver_sql("show transaction_read_only").scalar() == "off"
        assert connection.exec_driver_sql("show statement_timeout").scalar() == "0"
        assert connection.exec_driver_sql("select nextval('ticket')").scalar() == 1


@pytest.mark.postgres
async def test_an_entity_id_the_column_type_refuses_loses_only_its_own_fields(pg_engine: Engine, tmp_path: Path) -> None:
    with pg_engine.begin() as connection:
        connection.exec_driver_sql("create table accounts (id integer primary key, plan varchar(32))")
        connection.exec_driver_sql("insert into accounts values (1, 'pro'), (2, 'basic')")
    ruleset = load_rules(rules_dir(tmp_path, """
context_sources:
  acc: {sql: "select plan from accounts where id = :entity_id"}
rules:
  - {name: a, when: {}, owner: desk, context: [lookup.acc.plan]}
"""))
    enricher = ContextEnricher(ruleset, engine=pg_engine)

    def predicted(pid: str, entity_id: str) -> Prediction:
        return Prediction.model_validate(document(pid, entity_id))

    try:
        with capture_logs() as logs:
            # 'acct-x' is no integer: PostgreSQL refuses that query (and aborts its transaction).
            found = await enricher.lookup([predicted("p1", "1"), predicted("p2", "acct-x"), predicted("p3", "2")])
    finally:
        enricher.close()
    assert found == {"p1": {"acc": {"plan": "pro"}}, "p3": {"acc": {"plan": "basic"}}}
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["source"] == "acc" and warning["predictions"] == 3
    assert warning["error"].startswith("1 of 3 parameter sets failed, first {'entity_id': 'acct-x'}: InvalidTextRepresentation")
    assert enricher.failures["acc"] == 1


@pytest.mark.postgres
async def test_a_reload_that_drops_a_sql_source_closes_its_connections(pg_engine: Engine, tmp_path: Path) -> None:
    with pg_engine.begin() as connection:
        connection.exec_driver_sql("create table accounts (id text primary key, plan varchar(32))")
        connection.exec_driver_sql("insert into accounts values ('acct-1', 'pro')")
        schema = connection.exec_driver_sql("select current_schema()").scalar_one()  # the test's own
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    name = f"ctx-{uuid.uuid4().hex[:12]}"  # tells the source's connections apart in pg_stat_activity
    url = pg_engine.url.update_query_dict({"application_name": name}).render_as_string(hide_password=False)
    sources = f'context_sources:\n  acc: {{sql: "select plan from {schema}.accounts where id = :entity_id", database_url_env: CTX_URL}}\n'
    uses = "rules:\n  - {name: a, when: {}, owner: desk, context: [lookup.acc.plan]}\n"
    current = {"ruleset": load_rules(rules_dir(tmp_path / "v1", sources + uses))}
    enricher = ContextEnricher(lambda: current["ruleset"], engine=pg_engine, environ={"CTX_URL": url})

    def connections() -> int:
        with pg_engine.connect() as connection:
            query = "select count(*) from pg_stat_activity where application_name = %(name)s"
            return connection.exec_driver_sql(query, {"name": name}).scalar_one()

    try:
        prediction = Prediction.model_validate(document("p1", "acct-1"))
        assert await enricher.lookup([prediction]) == {"p1": {"acc": {"plan": "pro"}}}
        assert connections() == 1  # pooled for the next batch
        # Reloaded without the source: its pool is of no more use, and held a connection for good.
        current["ruleset"] = load_rules(rules_dir(tmp_path / "v2", "rules:\n  - {name: a, when: {}, owner: desk}\n"))
        assert await enricher.lookup([prediction]) == {}
        assert connections() == 0
    finally:
        enricher.close()
