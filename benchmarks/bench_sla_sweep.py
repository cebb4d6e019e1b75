"""The SLA sweep's query and what its due-time indexes cost inserts, before and after the partial
indexes (issue 8).

    python -m benchmarks.bench_sla_sweep --store sqlite                 # the sweep over 200,000 alerts
    python -m benchmarks.bench_sla_sweep --store postgres --explain     # and both queries' plans
    python -m benchmarks.bench_sla_sweep --store sqlite --insert-cost 100000 --routed-share 0.4

The sweep: two stores with the same alerts (bench_stats' mix, with the deadlines the service leaves at
NOW: every deadline that passed was escalated up to a breach, so nothing is due; alerts closed by an
outcome before their deadline keep it, as they did in stores written before stop 15), one with the
former indexes (ix_alerts_ack_due_at and _act_due_at on every alert), one with the partial ones; times
the former query on the first and escalation.due_alerts on the second, alternately, and prints median
and min.

With --insert-cost N it times inserting N new alerts (bench_stats' mix as the hot path writes them:
the deadlines of the 58% delivered to an owner set, or of --routed-share of them; no acknowledgement yet) in batches of 1,000 into
fresh stores with either pair of indexes, alternately (SQLite: CPU time; PostgreSQL: COPY, the server
backend's CPU time, read from /proc).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from benchmarks.bench_stats import (
    COLUMNS,
    POSTGRES_URL,
    SPAN_S,
    START,
    _insert,
    _sqlite_value,
    alerts,
    report,
    seed_postgres,
    seed_sqlite,
)
from decision_router import tracker
from decision_router.escalation import due_alerts
from decision_router.store import create_schema, make_engine
from decision_router.tables import DELIVERED_TO_OWNER, AlertRecord

NOW = START + timedelta(seconds=SPAN_S)  # the end of the seeded six weeks
FORMER_INDEXES = {"ix_alerts_ack_due_at": "ack_due_at", "ix_alerts_act_due_at": "act_due_at"}
PENDING_INDEXES = ["ix_alerts_ack_pending", "ix_alerts_act_pending"]
BENCH_STATS_ROUTED_SHARE = 0.58  # of bench_stats' alerts, delivered to an owner


def former_due_alerts(session: Session, *, now: datetime, limit: int = 500, by_id: bool = False) -> list[AlertRecord]:
    """escalation.due_alerts before the partial indexes: one select, the deadlines ORed. It ordered by
    created_at alone (ties in no set order); by_id adds the alert id, the order due_alerts gives ties now.
    Also the reference of tests/integration/test_due_alerts.py."""
    order = (AlertRecord.created_at, AlertRecord.alert_id) if by_id else (AlertRecord.created_at,)
    return list(session.scalars(
        select(AlertRecord)
        .where(
            AlertRecord.status == "open",
            DELIVERED_TO_OWNER,
            or_(
                and_(AlertRecord.acknowledged_at.is_(None), AlertRecord.ack_due_at <= now),
                and_(AlertRecord.intervened_at.is_(None), AlertRecord.act_due_at <= now),
            ),
        )
        .order_by(*order)
        .limit(limit)
    ))


def _unmet(due: datetime, met: datetime | None, closed: datetime | None) -> tuple[datetime | None, datetime | None]:
    """(due time, breached at) of one deadline as the service leaves it at NOW."""
    if met is not None:
        return None, None
    if closed is not None and closed < due:
        return due, None  # an outcome closed the alert first: the due time stays (older stores), the sweep skips it
    if due <= NOW:
        return None, due  # escalated up the chain, then breached (the time is the deadline's)
    return due, None


def swept_alerts(n: int) -> Iterator[dict[str, Any]]:
    """bench_stats' alerts with the SLA columns the service leaves at NOW: nothing due."""
    for row in alerts(n):
        row.update(ack_due_at=None, act_due_at=None, ack_breached_at=None, act_breached_at=None)
        if row["action"] == "alert" and not row["held_out"] and not row["suppressed_by"]:
            closed = min(row["outcome_at"], NOW) if row["status"] == "closed" else None
            row["ack_due_at"], row["ack_breached_at"] = _unmet(row["ack_by"], row["acknowledged_at"], closed)
            row["act_due_at"], row["act_breached_at"] = _unmet(row["act_by"], row["intervened_at"], closed)
        yield row


def new_alerts(n: int, routed_share: float | None = None) -> list[dict[str, Any]]:
    """bench_stats' alerts as the hot path inserts them: deadlines set for those delivered to an owner.
    With routed_share, enough of those become records that about that share has deadlines."""
    rows, rnd = [], random.Random(5)
    for row in alerts(n, seed=3):
        routed = row["action"] == "alert" and not row["held_out"] and not row["suppressed_by"]
        if routed and routed_share is not None and rnd.random() > routed_share / BENCH_STATS_ROUTED_SHARE:
            row["action"], routed = "record", False
        row.update(
            acknowledged_at=None, intervened_at=None, intervention=None, outcome=None, outcome_at=None,
            status="suppressed" if row["suppressed_by"] else "open", escalation_level=0,
            ack_breached_at=None, act_breached_at=None,
            ack_due_at=row["ack_by"] if routed else None, act_due_at=row["act_by"] if routed else None,
        )
        rows.append(row)
    return rows


def use_former_indexes(engine: Engine) -> None:
    with engine.begin() as connection:
        for name in PENDING_INDEXES:
            connection.execute(text(f"drop index {name}"))
        for name, column in FORMER_INDEXES.items():
            connection.execute(text(f"create index {name} on alerts ({column})"))


class Stores:
    """Fresh stores (SQLite files in a temporary directory, or PostgreSQL schemas), removed by close()."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.workdir = tempfile.TemporaryDirectory(prefix="bench-sla-")
        self.admin = make_engine(POSTGRES_URL) if kind == "postgres" else None
        self.engines: list[Engine] = []
        self.schemas: list[str] = []

    def new(self) -> tuple[Engine, Path | None]:
        if self.kind == "sqlite":
            path = Path(self.workdir.name) / f"{uuid.uuid4().hex[:8]}.db"
            engine = make_engine(f"sqlite:///{path}")
        else:
            assert self.admin is not None
            schema, path = f"bench_sla_{uuid.uuid4().hex[:8]}", None
            with self.admin.begin() as connection:
                connection.execute(text(f'create schema "{schema}"'))
            self.schemas.append(schema)
            engine = make_engine(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}")
        self.engines.append(engine)
        create_schema(engine)
        return engine, path

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()
        if self.admin is not None:
            with self.admin.begin() as connection:
                for schema in self.schemas:
                    connection.execute(text(f'drop schema "{schema}" cascade'))
            self.admin.dispose()
        self.workdir.cleanup()


def seeded(stores: Stores, n: int) -> Engine:
    engine, path = stores.new()
    engine.dispose()
    if path is not None:
        seed_sqlite(path, n, swept_alerts(n))
    else:
        seed_postgres(engine, n, swept_alerts(n))
    return engine


def sent_statements(engine: Engine, query: Callable[[Session], Any]) -> list[tuple[str, Any]]:
    """The (statement, parameters) that `query` sends, as sent. Also used by tests/integration/test_due_alerts.py."""
    from sqlalchemy import event

    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            query(session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return sent


def explain(engine: Engine, query: Callable[[Session], Any]) -> str:
    """The plan of the query `query` runs (EXPLAIN ANALYZE on PostgreSQL), captured as it is sent."""
    statement, parameters = sent_statements(engine, query)[-1]
    prefix = "explain query plan " if engine.dialect.name == "sqlite" else "explain (analyze, buffers) "
    with engine.connect() as connection:
        return "\n".join(str(row[-1]) for row in connection.exec_driver_sql(prefix + statement, parameters))


def index_size(engine: Engine, name: str) -> str:
    query = ("select sum(pgsize) from dbstat where name = :name" if engine.dialect.name == "sqlite"
             else "select pg_relation_size(:name)")
    with engine.connect() as connection:
        size = connection.execute(text(query), {"name": name}).scalar_one()
    return f"{name} {size / 1024:,.0f} KiB"


def sweep(kind: str, n: int, repeat: int, show_plans: bool) -> None:
    stores = Stores(kind)
    try:
        start = time.perf_counter()
        former, current = seeded(stores, n), seeded(stores, n)
        use_former_indexes(former)
        print(f"seeded two stores of {n:,} alerts in {time.perf_counter() - start:.1f} s")
        with Session(current) as session:
            pending = session.execute(text(
                "select (select count(*) from alerts where ack_due_at is not null),"
                " (select count(*) from alerts where act_due_at is not null),"
                " (select count(*) from alerts where status = 'open')")).one()
        print(f"alerts with an ack due time: {pending[0]:,}, an act due time: {pending[1]:,}; open: {pending[2]:,}")
        for name, engine, indexes in (("former", former, FORMER_INDEXES), ("partial", current, PENDING_INDEXES)):
            print(f"{name} due indexes: {', '.join(index_size(engine, index) for index in indexes)}")
        queries: dict[str, tuple[Engine, Callable[[Session], list[AlertRecord]]]] = {
            "former query, former indexes": (former, lambda s: former_due_alerts(s, now=NOW)),
            "due_alerts, partial indexes": (current, lambda s: due_alerts(s, now=NOW)),
        }
        times: dict[str, list[float]] = {name: [] for name in queries}
        found: dict[str, list[str]] = {}
        for _ in range(repeat):
            for name, (engine, query) in queries.items():
                with Session(engine) as session:
                    began = time.perf_counter()
                    found[name] = [r.alert_id for r in query(session)]
                    times[name].append(time.perf_counter() - began)
        for name, runs in times.items():
            report(f"{name} ({len(found[name])} due)", runs)
        if len({tuple(ids) for ids in found.values()}) != 1:
            raise SystemExit("the two queries found different alerts")
        if show_plans:
            for name, (engine, query) in queries.items():
                print(f"\n{name}:\n{explain(engine, query)}")
    finally:
        stores.close()


def insert_cost(kind: str, n: int, repeat: int, routed_share: float | None) -> None:
    rows = new_alerts(n, routed_share)
    values = [[_sqlite_value(row[c]) for c in COLUMNS] for row in rows]
    with_deadline = sum(row["ack_due_at"] is not None for row in rows)
    print(f"{n:,} new alerts, {with_deadline:,} with deadlines")
    times: dict[str, list[float]] = {"former due indexes": [], "partial due indexes": []}
    for _ in range(repeat):
        for config, runs in times.items():
            stores = Stores(kind)
            try:
                engine, _ = stores.new()
                if config == "former due indexes":
                    use_former_indexes(engine)
                runs.append(_insert(engine, rows, values) if kind == "sqlite" else _postgres_insert_cpu(engine, rows))
            finally:
                stores.close()
    for config, runs in times.items():
        per_row = statistics.median(runs) / n * 1e6
        print(f"{config:<22} median {statistics.median(runs):6.2f} s  min {min(runs):6.2f} s"
              f"  ({per_row:.1f} us/alert; runs: {', '.join(f'{r:.2f}' for r in runs)})")
    ratio = statistics.median(times["partial due indexes"]) / statistics.median(times["former due indexes"])
    print(f"partial / former: {ratio:.3f}")


def _postgres_insert_cpu(engine: Engine, rows: list[dict[str, Any]]) -> float:
    """CPU seconds of the PostgreSQL backend inserting the rows by COPY (tracker.bulk_insert) in batches of
    1,000, one transaction each: where the index writes are, with less of the wall time's noise on a busy
    host. Read from /proc, so the server must run on this host."""
    with engine.connect() as connection:
        backend = connection.execute(text("select pg_backend_pid()")).scalar_one()
        connection.commit()

        def cpu() -> float:
            fields = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

        start = cpu()
        for i in range(0, len(rows), 1000):
            with Session(bind=connection) as session:
                tracker.bulk_insert(session, AlertRecord.__table__, rows[i:i + 1000])  # type: ignore[attr-defined]
                session.commit()
            connection.commit()
        return cpu() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--alerts", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--explain", action="store_true", help="print both queries' plans")
    parser.add_argument("--insert-cost", type=int, metavar="N", help="time N alert inserts with either pair of indexes")
    parser.add_argument("--routed-share", type=float, metavar="F",
                        help="with --insert-cost: about this share of the alerts with deadlines (default 0.58)")
    args = parser.parse_args(argv)
    if args.insert_cost:
        insert_cost(args.store, args.insert_cost, args.repeat, args.routed_share)
    else:
        sweep(args.store, args.alerts, args.repeat, args.explain)


if __name__ == "__main__":
    main()
