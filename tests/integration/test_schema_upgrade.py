"""create_schema on a store created before the stats indexes: it builds them (and drops the ones
they replaced), also when several workers start on that store at once."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from decision_router import tables
from decision_router.store import create_schema

pytestmark = pytest.mark.postgres


def _waiting_for_alerts(engine: Engine) -> int:
    """How many sessions wait for a lock on the alerts table (the schema changes, held by the writer)."""
    with engine.connect() as connection:
        return connection.execute(text(
            "select count(distinct pid) from pg_locks where relation = 'alerts'::regclass and not granted")).scalar()


def create_schema_twice_behind_a_writer(pg_engine: Engine) -> list[BaseException]:
    """Two workers start (create_schema) while a running worker's insert holds the alerts table: both find
    the same change to make and wait; when the writer ends, one makes it first and the other must cope.
    Returns what the two raised."""
    writer = pg_engine.connect()
    writer.execute(text("lock table alerts in row exclusive mode"))
    failures: list[BaseException] = []

    def start_worker() -> None:
        try:
            create_schema(pg_engine)
        except Exception as exc:  # noqa: BLE001 - any error fails the caller's test
            failures.append(exc)

    workers = [threading.Thread(target=start_worker) for _ in range(2)]
    for worker in workers:
        worker.start()
    # Both wait on the lock (a fixed time is not enough on a busy machine: one that has not yet looked
    # when the lock goes would find the change made, and the clash untested).
    deadline = time.monotonic() + 60
    while _waiting_for_alerts(pg_engine) < 2:
        assert time.monotonic() < deadline, "the two workers never both waited on the lock"
        time.sleep(0.05)
    writer.rollback()
    writer.close()
    for worker in workers:
        worker.join(60)
    return failures


def test_workers_starting_together_build_the_new_stats_indexes_once(pg_engine: Engine) -> None:
    # An older store: without the rank indexes, with the index they retired.
    with pg_engine.begin() as connection:
        for name in ("ix_alerts_stats_ack_rank_pg", "ix_alerts_stats_act_rank_pg"):
            connection.execute(text(f"drop index {name}"))
        connection.execute(text("create index ix_alerts_stats_counts on alerts (rule)"))
    failures = create_schema_twice_behind_a_writer(pg_engine)
    assert not failures, failures
    with pg_engine.connect() as connection:
        present = set(connection.execute(text(
            "select indexname from pg_indexes where schemaname = current_schema() and tablename = 'alerts'")).scalars())
    assert set(tables.STATS_INDEXES["postgresql"]) <= present
    assert not present & set(tables.RETIRED_STATS_INDEXES["postgresql"])
