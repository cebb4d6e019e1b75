"""create_schema on a store created before some of its indexes (the stats indexes, the entity's index...):
it builds them without holding the writes of the running workers (CREATE INDEX CONCURRENTLY), builds again
one an interrupted build left invalid, and drops the ones they replaced, also when several workers start on
that store at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session
from structlog.testing import capture_logs

from decision_router import tables
from decision_router.store import create_schema, make_engine, schema_is_current
from tests.integration.test_tallies import a_role
from tests.unit.test_stats import alert

pytestmark = pytest.mark.postgres

WAITING_FOR_A_BUILD = "waiting for another worker's index builds"


def _vxid(connection: Connection) -> str:
    """The virtual transaction id of the session's open transaction (what a concurrent build waits on)."""
    return connection.execute(text(
        "select virtualxid from pg_locks where pid = pg_backend_pid() and locktype = 'virtualxid'")).scalar_one()


def _waiting_for(engine: Engine, vxid: str) -> int:
    """How many sessions wait for the transaction `vxid`: for the lock it holds on the alerts table (an ALTER
    TABLE, a plain CREATE INDEX) or for it to end (a concurrent build waits for the writes running as it starts)."""
    with engine.connect() as connection:
        return connection.execute(text(
            "select count(distinct pid) from pg_locks where not granted and (relation = 'alerts'::regclass"
            " or (locktype = 'virtualxid' and virtualxid = :vxid))"), {"vxid": vxid}).scalar()


def _wait_until(condition: Callable[[], object], what: str) -> None:
    # No fixed time: a busy machine is slow to get there.
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def create_schema_twice_behind_a_writer(pg_engine: Engine) -> tuple[list[BaseException], list[dict]]:
    """Two workers start (create_schema) while a running worker's insert holds the alerts table: both find
    the same change to make and wait (for the writer, or the one for the other's index build); when the
    writer ends, one makes it first and the other must cope. Returns what the two raised, and what they logged."""
    writer = pg_engine.connect()
    writer.execute(text("lock table alerts in row exclusive mode"))
    running = _vxid(writer)
    failures: list[BaseException] = []

    def start_worker() -> None:
        try:
            create_schema(pg_engine)
        except Exception as exc:  # noqa: BLE001 - any error fails the caller's test
            failures.append(exc)

    workers = [threading.Thread(target=start_worker, daemon=True) for _ in range(2)]
    with capture_logs() as logs:
        try:
            for worker in workers:
                worker.start()
            # Both wait (one that has not yet looked when the writer ends would find the change made, and the
            # clash untested). A worker waiting for another's index build polls for it: only its log shows it.
            _wait_until(lambda: _waiting_for(pg_engine, running) + sum(
                entry["event"] == WAITING_FOR_A_BUILD for entry in logs) >= 2, "the two workers to both wait")
        finally:  # also when they did not: the schema's drop would wait for the writer
            writer.rollback()
            writer.close()
            for worker in workers:
                worker.join(60)
    return failures, logs


def index_validity(engine: Engine) -> dict[str, bool]:
    """Each index of the store's alerts table: whether queries may use it (an interrupted concurrent build
    leaves one they may not)."""
    with engine.connect() as connection:
        return dict(connection.execute(text(
            "select c.relname, i.indisvalid from pg_index i join pg_class c on c.oid = i.indexrelid"
            " where i.indrelid = 'alerts'::regclass")).all())


def built(logs: list[dict]) -> list[str]:
    return sorted(entry["index"] for entry in logs if entry["event"] == "building index")


def test_workers_starting_together_build_the_new_stats_indexes_once(pg_engine: Engine) -> None:
    # An older store: without the rank indexes, with the index they retired.
    with pg_engine.begin() as connection:
        for name in ("ix_alerts_stats_ack_rank_pg", "ix_alerts_stats_act_rank_pg"):
            connection.execute(text(f"drop index {name}"))
        connection.execute(text("create index ix_alerts_stats_counts on alerts (rule)"))
    failures, logs = create_schema_twice_behind_a_writer(pg_engine)
    assert not failures, failures
    present = index_validity(pg_engine)
    assert all(present[name] for name in tables.STATS_INDEXES["postgresql"])
    assert not set(present) & set(tables.RETIRED_STATS_INDEXES["postgresql"])
    # One worker built each (concurrently, see below); the other waited for it and found them built.
    assert built(logs) == ["ix_alerts_stats_ack_rank_pg", "ix_alerts_stats_act_rank_pg"]
    assert all(entry["concurrently"] for entry in logs if entry["event"] == "building index")
    assert schema_is_current(pg_engine)


def store_alerts(engine: Engine, numbers: range) -> None:
    with Session(engine) as session:
        session.add_all(alert(n, rule="churn-high", owner="alice") for n in numbers)
        session.commit()


def test_an_index_an_older_store_lacks_is_built_while_the_workers_write(pg_engine: Engine) -> None:
    store_alerts(pg_engine, range(100))
    with pg_engine.begin() as connection:  # a store from before alerts were indexed by entity, rule and time
        connection.execute(text("drop index ix_alerts_entity"))
    # A running worker (of the older version) is storing a batch as the new version starts: the build
    # waits for it, and holds it there.
    running = pg_engine.connect()
    running.execute(text("lock table alerts in row exclusive mode"))
    batch = _vxid(running)
    upgrade = threading.Thread(target=create_schema, args=(pg_engine,), daemon=True)
    with capture_logs() as logs:
        try:
            upgrade.start()
            _wait_until(lambda: _waiting_for(pg_engine, batch) == 1, "the build to wait for the running batch")
            # The next batch is stored meanwhile: behind a plain CREATE INDEX, it would wait for the whole build.
            with Session(pg_engine) as session:
                session.execute(text("set local lock_timeout = '5s'"))
                session.add(alert(100, rule="churn-high", owner="alice"))
                session.commit()
            assert upgrade.is_alive()  # the build still waits: the batch went in during it
        finally:
            running.rollback()
            running.close()
            upgrade.join(60)
    assert not upgrade.is_alive()

    assert index_validity(pg_engine)["ix_alerts_entity"]
    assert schema_is_current(pg_engine)
    with pg_engine.connect() as connection:  # and the cooldown's and an entity's reads use it
        connection.execute(text("set enable_seqscan = off"))
        plan = " ".join(connection.execute(text(
            "explain select * from alerts where entity_id = 'a100' and rule = 'churn-high'")).scalars())
    assert "ix_alerts_entity" in plan, plan
    building = [entry for entry in logs if entry["event"] == "building index"]
    assert building == [{"event": "building index", "index": "ix_alerts_entity", "table": "alerts",
                         "concurrently": True, "log_level": "info"}]
    done = [entry for entry in logs if entry["event"] == "index built"]
    assert [entry["index"] for entry in done] == ["ix_alerts_entity"] and done[0]["seconds"] >= 0


ENTITY_INDEX = "CREATE INDEX CONCURRENTLY ix_alerts_entity ON alerts (entity_id, rule, created_at)"


def interrupt_a_concurrent_build(engine: Engine) -> None:
    """Leave ix_alerts_entity invalid, as a worker killed during its concurrent build does: the build waits
    for a long read's snapshot before it ends, and is cancelled there."""
    reader = engine.connect()
    reader.execute(text("set transaction isolation level repeatable read"))
    reader.execute(text("select count(*) from alerts"))  # its snapshot: the build waits for it
    builder = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    pid = builder.execute(text("select pg_backend_pid()")).scalar_one()
    raised: list[BaseException] = []

    def build() -> None:
        try:
            builder.exec_driver_sql(ENTITY_INDEX)
        except OperationalError as exc:
            raised.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    try:
        with engine.connect() as watcher:
            _wait_until(lambda: watcher.execute(text("select count(*) from pg_locks where pid = :pid and not granted"),
                                                {"pid": pid}).scalar(), "the build to wait for the read")
            watcher.execute(text("select pg_cancel_backend(:pid)"), {"pid": pid})
    finally:
        reader.rollback()
        reader.close()
        thread.join(60)
        builder.close()
    assert raised and "canceling statement" in str(raised[0])


def test_an_index_left_invalid_by_an_interrupted_build_is_built_again(pg_engine: Engine) -> None:
    store_alerts(pg_engine, range(10))
    with pg_engine.begin() as connection:
        connection.execute(text("drop index ix_alerts_entity"))
    interrupt_a_concurrent_build(pg_engine)
    assert index_validity(pg_engine)["ix_alerts_entity"] is False
    assert not schema_is_current(pg_engine)  # so `stats` runs create_schema on it too

    with capture_logs() as logs:
        create_schema(pg_engine)

    assert index_validity(pg_engine)["ix_alerts_entity"]
    assert schema_is_current(pg_engine)
    assert [entry["event"] for entry in logs if entry.get("index") == "ix_alerts_entity"] == [
        "dropping an invalid index left by an unfinished build", "building index", "index built"]


def test_workers_starting_together_on_an_index_left_invalid_build_it_once(pg_engine: Engine) -> None:
    store_alerts(pg_engine, range(10))
    with pg_engine.begin() as connection:
        connection.execute(text("drop index ix_alerts_entity"))
    interrupt_a_concurrent_build(pg_engine)
    failures, logs = create_schema_twice_behind_a_writer(pg_engine)
    assert not failures, failures
    assert index_validity(pg_engine)["ix_alerts_entity"]
    assert built(logs) == ["ix_alerts_entity"]


def test_a_role_that_may_not_build_an_index_is_refused_at_its_first_attempt(pg_engine: Engine) -> None:
    # A reporting role (it may read the store, not own its tables) runs `stats` on a store the new version
    # has not opened yet: the build is refused for want of a right, which no second attempt gets. It used
    # to be tried 10 times, logging "building index" 10 times for one index never built.
    with pg_engine.begin() as connection:
        connection.execute(text("drop index ix_alerts_suppressed_closed"))
    with a_role(pg_engine, every_table=True) as (role, schema):
        reader = make_engine(pg_engine.url.set(username=role).render_as_string(hide_password=False), connect_args={"options": f"-csearch_path={schema}"})
        try:
            with capture_logs() as logs, pytest.raises(ProgrammingError, match="must be owner of table alerts"):
                create_schema(reader)
        finally:
            reader.dispose()
    assert built(logs) == ["ix_alerts_suppressed_closed"]
