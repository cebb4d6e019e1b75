"""How long `stats --by rule` takes over a store of 1,000,000 alerts (issue 8).

    python -m benchmarks.bench_stats --store sqlite            # a fresh SQLite file in a temp dir
    python -m benchmarks.bench_stats --store postgres          # a private schema, dropped afterwards
    python -m benchmarks.bench_stats --store sqlite --db /tmp/stats.db --keep   # seed once, time again later
    python -m benchmarks.bench_stats --store postgres --insert-cost 100000       # what the stats indexes cost writes
    python -m benchmarks.bench_stats --store postgres --insert-cost 100000 --insert-cost-of tallies --insert-batch 40

Seeds the alerts table with a realistic mix (bulk inserts: executemany on SQLite, COPY on
PostgreSQL), then times, several times each, and prints median and min:
- `compute_stats(by=rule)` in this process (the query and the maths);
- `compute_stats_reference(by=rule)`, the former load-every-row tally, unless --no-reference;
- the rules loaded before compute_stats, and loading in a thread while it counts (as the CLI does on PostgreSQL);
- the CLI `decision-router stats --by rule --format json` as a subprocess (wall time, start-up included).

With --insert-cost N it instead times inserting N alerts in batches of 1,000 (--insert-batch; SQLite: the
driver's executemany, CPU time; PostgreSQL: tracker.bulk_insert's COPY, wall time), as the routing hot
path writes them, into fresh stores with and without the stats indexes (tables.STATS_INDEXES), alternately;
with --insert-cost-of tallies, with and without the triggers that keep PostgreSQL's tallies (tallies.py).

The mix: 200 rules (a few busy ones, a long tail), 60 owners, 20 models over 6 weeks; about
half the decisions routed to an owner, 2% suppressed, the rest recorded; every fourth rule has a
10% holdout (control group); of the routed, 75% acknowledged and 40% acted on after log-normal
delays (microsecond timestamps), 60% with an outcome; some escalations and SLA breaches.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router import tallies, tracker
from decision_router.stats import GroupBy, compute_stats, compute_stats_reference
from decision_router.store import create_schema, make_engine
from decision_router.tables import STATS_INDEXES, AlertRecord

POSTGRES_URL = os.environ.get("DECISION_ROUTER_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
START = datetime(2026, 10, 12, tzinfo=UTC)  # a Monday; 6 weeks of alerts from here
SPAN_S = 6 * 7 * 86400
RULES = [f"rule-{i:03d}" for i in range(200)]
# Busy rules first: weight 1/(i+1) gives a few large groups and a long tail, as real rule sets have.
RULE_WEIGHTS = [1 / (i + 1) for i in range(len(RULES))]
HOLDOUT_RULES = {rule: 0.1 for rule in RULES[::4]}  # every fourth rule has a 10% control group
OWNERS = [f"owner-{i:02d}" for i in range(60)]
MODELS = [f"model-{i:02d}" for i in range(20)]
RULE_INDEX = {rule: i for i, rule in enumerate(RULES)}
COLUMNS = [c.name for c in AlertRecord.__table__.columns]


def alerts(n: int, seed: int = 8) -> Iterator[dict[str, Any]]:
    """`n` alert rows as column -> Python value (timestamps timezone-aware UTC)."""
    rnd = random.Random(seed)
    rules = rnd.choices(RULES, RULE_WEIGHTS, k=n)
    for i, rule in enumerate(rules):
        created = START + timedelta(microseconds=rnd.randrange(SPAN_S * 1_000_000))
        owner = OWNERS[RULE_INDEX[rule] % len(OWNERS)] if rnd.random() < 0.8 else rnd.choice(OWNERS)
        model = MODELS[RULE_INDEX[rule] % len(MODELS)]
        u = rnd.random()
        held = rule in HOLDOUT_RULES and u < 0.06  # 0.06 of 0.6 that reach an owner or the control: 10%
        suppressed = not held and u > 0.98
        action = "alert" if u < 0.6 else "record"
        row: dict[str, Any] = {
            "alert_id": f"al-{i:07d}", "prediction_id": f"p-{i:07d}", "rule": rule, "owner": owner,
            "original_owner": owner, "owner_source": "static", "fallback_reason": None, "delegated_from": None,
            "priority": rnd.choice(("high", "normal", "normal", "low")), "action": action, "model": model,
            "model_version": str(1 + (i % 3)), "entity_type": "account", "entity_id": f"acct-{rnd.randrange(200_000)}",
            "score": round(rnd.random(), 4), "context": {"segment": f"seg-{i % 7}", "arr": rnd.randrange(1000, 90000)},
            "missing_context": [], "rules_version": "bench", "predicted_at": created, "created_at": created,
            "ack_by": created + timedelta(hours=4), "act_by": created + timedelta(days=2), "delivered_at": None,
            "acknowledged_at": None, "intervened_at": None, "intervention": None, "outcome": None,
            "outcome_at": None, "outcome_value": None, "status": "open", "held_out": held,
            "suppressed_by": f"al-{i - 1:07d}" if suppressed else None, "ack_due_at": None, "act_due_at": None,
            "escalation_level": 0, "escalated_to": None, "ack_breached_at": None, "act_breached_at": None,
            "sla_revision": 0,
        }
        routed = action == "alert" and not held and not suppressed
        if routed:
            row["delivered_at"] = created + timedelta(milliseconds=rnd.randrange(1, 50))
            if rnd.random() < 0.75:
                row["acknowledged_at"] = created + timedelta(seconds=rnd.lognormvariate(7, 1.2))
                if rnd.random() < 0.55:
                    row["intervened_at"] = row["acknowledged_at"] + timedelta(seconds=rnd.lognormvariate(8, 1))
                    row["intervention"] = "called"
            else:
                row["ack_due_at"] = row["ack_by"]
            if rnd.random() < 0.05:
                row["escalation_level"] = rnd.choice((1, 1, 2))
                row["ack_breached_at"] = row["ack_by"] if rnd.random() < 0.5 else None
            if rnd.random() < 0.02:
                row["act_breached_at"] = row["act_by"]
        if suppressed:
            row["status"] = "suppressed"
        elif rnd.random() < 0.6:
            treated_bonus = 0.08 if routed and row["intervened_at"] else 0.0
            row["outcome"] = "success" if rnd.random() < 0.3 + treated_bonus else "failure"
            row["outcome_at"] = created + timedelta(days=rnd.uniform(1, 20))
            row["status"] = "closed"
        yield row


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _sqlite_value(value: Any) -> Any:
    # The formats SQLAlchemy's SQLite types write, so the app reads these rows as its own.
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value


def seed_sqlite(path: Path, n: int, rows: Iterator[dict[str, Any]] | None = None) -> None:
    """`rows` (default: `alerts(n)`) into the alerts table."""
    connection = sqlite3.connect(path)
    placeholders = ", ".join("?" for _ in COLUMNS)
    sql = f"insert into alerts ({', '.join(COLUMNS)}) values ({placeholders})"
    with connection:
        for chunk in _chunks(alerts(n) if rows is None else rows, 50_000):
            connection.executemany(sql, [[_sqlite_value(row[c]) for c in COLUMNS] for row in chunk])
    connection.execute("analyze")
    connection.close()


def _copy_value(value: Any) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        value = json.dumps(value)
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def seed_postgres(engine: Engine, n: int, rows: Iterator[dict[str, Any]] | None = None) -> None:
    """`rows` (default: `alerts(n)`) into the alerts table."""
    with engine.begin() as connection:
        cursor = connection.connection.driver_connection.cursor()
        with cursor.copy(f"copy alerts ({', '.join(COLUMNS)}) from stdin") as copy:
            for chunk in _chunks(alerts(n) if rows is None else rows, 50_000):
                buffer = io.StringIO()
                for row in chunk:
                    buffer.write("\t".join(_copy_value(row[c]) for c in COLUMNS) + "\n")
                copy.write(buffer.getvalue())
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        # What autovacuum does soon after a bulk load: statistics and the visibility map.
        connection.execute(text("vacuum analyze alerts"))


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def cli_once(url: str) -> Callable[[], str]:
    env = {**os.environ, "DECISION_ROUTER_DATABASE_URL": url, "DECISION_ROUTER_RULES_DIR": str(_rules_dir())}

    def run() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "decision_router", "stats", "--by", "rule", "--format", "json"],
            env=env, capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"decision-router stats failed: {done.stderr.strip()}")
        return done.stdout

    return run


def _rules_dir() -> Path:
    """A rules directory declaring the seeded rules' holdouts, so the CLI runs the sample ratio check too."""
    target = Path(tempfile.gettempdir()) / "bench-stats-rules"
    target.mkdir(exist_ok=True)
    rules = [
        {"name": rule, "when": {"model": MODELS[i % len(MODELS)]}, "owner": OWNERS[i % len(OWNERS)],
         **({"holdout": HOLDOUT_RULES[rule]} if rule in HOLDOUT_RULES else {})}
        for i, rule in enumerate(RULES)
    ] + [{"name": "catch-all", "when": {}, "owner": OWNERS[0], "action": "record"}]
    owners = {"owners": [{"id": owner, "name": owner, "email": f"{owner}@example.com"} for owner in OWNERS]}
    (target / "routing.yaml").write_text(json.dumps({"rules": rules}))
    (target / "owners.yaml").write_text(json.dumps(owners))
    return target


def report(name: str, times: list[float]) -> None:
    ms = [t * 1000 for t in times]
    print(f"{name:<44} median {statistics.median(ms):8.1f} ms   min {min(ms):8.1f} ms   ({len(ms)} runs)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--alerts", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", type=Path, help="SQLite file (seeded only if it has no alerts yet)")
    parser.add_argument("--schema", help="PostgreSQL schema (default: a fresh private one)")
    parser.add_argument("--keep", action="store_true", help="keep the SQLite file / PostgreSQL schema afterwards")
    parser.add_argument("--no-reference", action="store_true", help="skip the former Python tally")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI wall time")
    parser.add_argument("--insert-cost", type=int, metavar="N", help="time N alert inserts with/without the indexes")
    parser.add_argument("--insert-cost-of", choices=("indexes", "tallies"), default="indexes",
                        help="with --insert-cost: with/without the stats indexes, or (postgres) the tallies' triggers")
    parser.add_argument("--insert-batch", type=int, default=1000, help="with --insert-cost: alerts per transaction")
    args = parser.parse_args(argv)
    if args.insert_cost:
        if args.insert_cost_of == "tallies" and args.store != "postgres":
            parser.error("--insert-cost-of tallies: only PostgreSQL keeps tallies")
        insert_cost(args.store, args.insert_cost, args.repeat, args.insert_cost_of, args.insert_batch)
        return

    def cleanup() -> None:
        return None
    if args.store == "sqlite":
        workdir = None if args.db else tempfile.TemporaryDirectory(prefix="bench-stats-")
        path = args.db or Path(workdir.name) / "stats.db"  # type: ignore[union-attr]
        url = f"sqlite:///{path}"
        engine = make_engine(url, mapped_reads=True)  # as the stats command opens it
        if workdir is not None and not args.keep:
            cleanup = workdir.cleanup
    else:
        schema = args.schema or f"bench_stats_{uuid.uuid4().hex[:8]}"
        admin = make_engine(POSTGRES_URL)
        with admin.begin() as connection:
            connection.execute(text(f'create schema if not exists "{schema}"'))
        url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
        engine = make_engine(url)

        def drop() -> None:
            engine.dispose()
            with admin.begin() as connection:
                connection.execute(text(f'drop schema "{schema}" cascade'))
            admin.dispose()

        if not args.keep:
            cleanup = drop
    try:
        create_schema(engine)
        with Session(engine) as session:
            have = session.execute(text("select count(*) from alerts")).scalar_one()
        if have == 0:
            start = time.perf_counter()
            engine.dispose()
            if args.store == "sqlite":
                seed_sqlite(path, args.alerts)
            else:
                seed_postgres(engine, args.alerts)
            have = args.alerts
            print(f"seeded {args.alerts:,} alerts in {time.perf_counter() - start:.1f} s")
            tallies.fold_tallies(engine, at_rows=0)  # as `serve` does every few seconds (PostgreSQL)
        print(f"store: {args.store} ({have:,} alerts); stats --by rule:")
        with Session(engine) as session:
            times, rows = timed(lambda: compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUT_RULES), args.repeat)
            report("compute_stats(by=rule)", times)
            if args.store == "postgres":
                unfolded(session, rows, args.repeat)
            if not args.no_reference:
                ref_times, expected = timed(
                    lambda: compute_stats_reference(session, by=GroupBy.RULE, holdouts=HOLDOUT_RULES),
                    max(1, args.repeat // 2),
                )
                report("compute_stats_reference(by=rule) (before)", ref_times)
                same = [r.as_dict() for r in rows] == [r.as_dict() for r in expected]
                print(f"same rows as the reference: {'yes' if same else 'NO'}")
                if not same:
                    raise SystemExit(1)
            rules_overlap(session, args.repeat)
        if not args.no_cli:
            cli_times, output = timed(cli_once(url), args.repeat)
            report("decision-router stats --by rule (wall)", cli_times)
            assert len(json.loads(output)) == len(rows)
            start_times, _ = timed(_startup_only, args.repeat)
            report("  of which: python -c 'import decision_router.cli'", start_times)
    finally:
        engine.dispose()
        cleanup()


def unfolded(session: Session, rows: list[Any], repeat: int, differences: int = 20_000) -> None:
    """compute_stats with `differences` rows appended to PostgreSQL's tallies and not yet folded: about as
    many as `serve` leaves (it folds them past tallies.FOLD_AT_ROWS, every FOLD_INTERVAL_S).
    They add up to nothing (+1 and -1 in pairs); folded afterwards."""
    engine = session.get_bind()
    with engine.begin() as connection:  # type: ignore[union-attr]
        groups = connection.execute(text(f"select count(*) from {tallies.TABLE}")).scalar_one()
        group = connection.execute(text(f"select rule, held_out, action, outcome, live from {tallies.TABLE} limit 1")
                                   ).one()._asdict()
        connection.execute(text(
            f"insert into {tallies.TABLE} (rule, held_out, action, outcome, live, n, escalations, ack_breaches,"
            " act_breaches, acks, acts) values (:rule, :held_out, :action, :outcome, :live, :n, 0, 0, 0, 0, 0)"),
            [group | {"n": 1 - 2 * (i % 2)} for i in range(differences)])
    times, got = timed(lambda: compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUT_RULES), repeat)
    report(f"  with {differences:,} differences to fold ({groups:,} rows folded)", times)
    assert [r.as_dict() for r in got] == [r.as_dict() for r in rows]
    tallies.fold_tallies(engine, at_rows=0)  # type: ignore[arg-type]


def rules_overlap(session: Session, repeat: int) -> None:
    """What the CLI does with the rules: load them, then compute_stats; or load them in a thread
    while compute_stats counts (cli_stats.RulesLoading). Alternately, the rules module imported."""
    from decision_router import cli_stats, rules  # noqa: F401

    rules_dir = _rules_dir()
    times: dict[str, list[float]] = {"rules loaded, then compute_stats": [], "  rules loading in a thread meanwhile": []}
    for _ in range(repeat):
        for name, runs in times.items():
            in_thread = name.strip().startswith("rules loading")
            start = time.perf_counter()
            holdouts = cli_stats.RulesLoading(rules_dir, in_thread=in_thread)
            compute_stats(session, by=GroupBy.RULE, holdouts=holdouts)
            runs.append(time.perf_counter() - start)
    for name, runs in times.items():
        report(name, runs)


def insert_cost(store: str, n: int, repeat: int, of: str = "indexes", batch: int = 1000) -> None:
    """`of`: the stats indexes, or (PostgreSQL) the triggers that keep the tallies (tallies.py)."""
    rows = list(alerts(n, seed=3))
    values = [[_sqlite_value(row[c]) for c in COLUMNS] for row in rows]
    with_them = "with the stats indexes" if of == "indexes" else "with the tallies"
    times: dict[str, list[float]] = {with_them: [], "without": []}
    for _ in range(repeat):
        for config, runs in times.items():
            with tempfile.TemporaryDirectory(prefix="bench-inserts-") as workdir:
                schema = f"bench_inserts_{uuid.uuid4().hex[:8]}"
                admin = make_engine(POSTGRES_URL)
                if store == "sqlite":
                    url = f"sqlite:///{workdir}/inserts.db"
                else:
                    with admin.begin() as connection:
                        connection.execute(text(f'create schema "{schema}"'))
                    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
                engine = make_engine(url)
                try:
                    create_schema(engine)
                    if config == "without":
                        with engine.begin() as connection:
                            if of == "tallies":
                                for trigger in tallies.TRIGGERS:
                                    connection.execute(text(f"drop trigger {trigger} on alerts"))
                            for name in STATS_INDEXES[engine.dialect.name] if of == "indexes" else ():
                                connection.execute(text(f"drop index {name}"))
                    runs.append(_insert(engine, rows, values, batch))
                finally:
                    engine.dispose()
                    if store != "sqlite":
                        with admin.begin() as connection:
                            connection.execute(text(f'drop schema "{schema}" cascade'))
                    admin.dispose()
    for config, runs in times.items():
        per_row = statistics.median(runs) / n * 1e6
        print(f"{n:,} alert inserts, {config:<24} median {statistics.median(runs):6.2f} s  ({per_row:.1f} us/alert)")
    ratio = statistics.median(times[with_them]) / statistics.median(times["without"])
    print(f"with / without: {ratio:.2f}")


def _insert(engine: Engine, rows: list[dict[str, Any]], values: list[list[Any]], batch: int = 1000) -> float:
    """Seconds to insert the rows in batches, one transaction each (SQLite: CPU seconds)."""
    if engine.dialect.name == "sqlite":
        sql = f"insert into alerts ({', '.join(COLUMNS)}) values ({', '.join('?' for _ in COLUMNS)})"
        with engine.connect() as connection:
            driver = connection.connection.driver_connection
            start = time.process_time()  # the insert runs in this process: CPU time is what load does not blur
            for i in range(0, len(values), batch):
                driver.executemany(sql, values[i:i + batch])
                driver.commit()
            return time.process_time() - start
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        with Session(engine) as session, session.begin():  # the hot path's write: COPY
            tracker.bulk_insert(session, AlertRecord.__table__, rows[i:i + batch])  # type: ignore[attr-defined]
    return time.perf_counter() - start


def _startup_only() -> None:
    subprocess.run([sys.executable, "-c", "import decision_router.cli"], check=True)


if __name__ == "__main__":
    main()
