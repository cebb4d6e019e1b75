"""`python -m benchmarks.run` (or `decision-router bench`): issue 8's benchmark in one run.

On the same stream contents (one backlog, one consumer group per reader):
  (a) the bare redis-py + hiredis loop: XREADGROUP COUNT 1000, json.loads, XACK;
  (b) a FastStream batch subscriber with an empty handler;
  (c) decision-router's full pipeline through the real service (`running_service`);
then, with the router as a subprocess (`python -m decision_router serve`): end-to-end
latency at a steady offered rate, peak RSS and its growth over a long run, and on
PostgreSQL two router processes in one consumer group against one.

Everything lives under a private stream prefix (deleted afterwards) and, on PostgreSQL, a
private schema (dropped afterwards). `--quick` scales every part down to a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import sqlalchemy

from benchmarks.workload import (
    ACCOUNT_MANAGERS,
    UPSELL_OWNER,
    new_run_id,
    paced,
    prediction,
    publish_backlog,
    write_rules,
)
from decision_router.settings import redact_url

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
INBOX_OWNERS = (*ACCOUNT_MANAGERS, UPSELL_OWNER)
PARTS = ("bare", "faststream", "pipeline", "latency", "rss", "scaleout", "stats")


@dataclass
class Row:
    what: str
    value: str
    note: str = ""
    key: str = ""  # of its figure in Report.figures, if it has one
    unit: str = ""


def shown(value: float, unit: str) -> str:
    return (f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:,.2f} {unit}").strip()


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, what: str, value: float, unit: str, note: str = "") -> None:
        self.figures[key] = value
        self.rows.append(Row(what, shown(value, unit), note, key, unit))
        print(f"  {what}: {shown(value, unit)} {note}", flush=True)

    def table(self) -> str:
        return markdown([("what", "figure", "note"), *((r.what, r.value, r.note) for r in self.rows)])


def markdown(rows: list[tuple[str, ...]]) -> str:
    """A table whose first row is the header, columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def medians(reports: list[Report]) -> Report:
    """One report of the medians of several runs' figures, each row noting every run's figure."""
    merged = Report()
    for row in reports[0].rows:
        runs = [r.figures[row.key] for r in reports if row.key in r.figures]
        if not row.key or len(runs) < len(reports):
            merged.rows.append(row)
            continue
        merged.figures[row.key] = statistics.median(runs)
        each = ", ".join(shown(v, "") for v in runs)
        note = f"runs: {each}; {row.note}".rstrip("; ")
        merged.rows.append(Row(row.what, shown(merged.figures[row.key], row.unit), note, row.key, row.unit))
    return merged


# Issue 8's targets: (figure, the target, whether a figure meets it).
TARGETS: tuple[tuple[str, str, Callable[[float], bool]], ...] = (
    ("pipeline", "(c) >= 20,000 predictions/s with one router process", lambda v: v >= 20_000),
    ("c_a", "c/a >= 0.5", lambda v: v >= 0.5),
    ("latency_p99_ms", "p99 end-to-end latency <= 25 ms at 2,000/s", lambda v: v <= 25),
    ("scale_ratio", "two router processes >= 1.6x one", lambda v: v >= 1.6),
    # Over the second half: SQLite's page caches fill during the first few hundred thousand.
    ("rss_growth_second_half_pct", "RSS growth <= 10% over 1,000,000 predictions", lambda v: v <= 10),
)


def targets_table(report: Report, args: argparse.Namespace, runs: int) -> str:
    """Each target this run measured, its figure (the median if several runs) and whether it is met."""
    unlike = []  # where this run's conditions differ from the issue's
    if args.quick:
        unlike.append("--quick scales every part down")
    if "pipeline" in args.parts and args.predictions != 200_000:
        unlike.append(f"(c) over {args.predictions:,}, not 200,000")
    if "latency" in args.parts and args.rate != 2000:
        unlike.append(f"latency at {args.rate:,.0f}/s, not 2,000/s")
    if "rss" in args.parts and args.rss_predictions != 1_000_000:
        unlike.append(f"RSS over {args.rss_predictions:,}, not 1,000,000")
    units = {row.key: row.unit for row in report.rows}
    rows = [("target (issue 8)", f"median of {runs}" if runs > 1 else "figure", "status")]
    for key, target, met in TARGETS:
        if key in report.figures:
            value = report.figures[key]
            rows.append((target, shown(value, units.get(key, "")), "met" if met(value) else "NOT MET"))
    if len(rows) == 1:
        return ""
    caveat = f"\n(not the issue's conditions: {'; '.join(unlike)})" if unlike else ""
    return markdown(rows) + caveat


# stores ---------------------------------------------------------------------------


@dataclass
class Store:
    """A fresh database for one part of the run: a SQLite file, or a PostgreSQL schema."""

    url: str  # for make_engine and DECISION_ROUTER_DATABASE_URL
    drop: Callable[[], None]


def new_store(kind: str, workdir: Path, postgres_url: str, name: str) -> Store:
    if kind == "sqlite":
        path = workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return Store(f"sqlite:///{path}", lambda: None)
    schema = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(postgres_url)
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f'create schema "{schema}"'))

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'drop schema if exists "{schema}" cascade'))
        admin.dispose()

    sep = "&" if "?" in postgres_url else "?"
    return Store(f"{postgres_url}{sep}options=-csearch_path%3D{schema}", drop)


def engine_for(store: Store, *, background_checkpoints: bool = False) -> sqlalchemy.engine.Engine:
    from decision_router.store import create_schema, make_engine

    engine = make_engine(store.url, background_checkpoints=background_checkpoints)
    create_schema(engine)
    return engine


# progress of a consumer group -------------------------------------------------------


def group_progress(client: redis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(entries read by the group, entries pending) — (0, 0) before the group exists."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0, 0
    for info in groups:
        if _text(info["name"]) == group:
            return int(info.get("entries-read") or 0), int(info["pending"])
    return 0, 0


def wait_consumed(client: redis.Redis, stream: str, group: str, total: int, *, timeout: float,
                  alive: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Wait until the group has read and acknowledged `total` entries; returns (first progress,
    done) as perf_counter instants, so start-up is not counted."""
    first = None
    deadline = time.monotonic() + timeout
    while True:
        read, pending = group_progress(client, stream, group)
        now = time.perf_counter()
        if first is None and read > 0:
            first = now
        if read >= total and pending == 0:
            return first or now, now
        if time.monotonic() > deadline:
            raise TimeoutError(f"{group} consumed {read - pending} of {total} in {timeout:.0f}s")
        alive()
        time.sleep(0.01)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    batch = []
    for key in client.scan_iter(match=f"{prefix}*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)


# (a) bare loop, (b) FastStream ---------------------------------------------------------


def bare_loop(redis_url: str, stream: str, total: int) -> float:
    """XREADGROUP COUNT 1000, json.loads each entry, XACK: the floor of what Python reads."""
    client = redis.Redis.from_url(redis_url)
    group = "bench-bare"
    client.xgroup_create(stream, group, id="0")
    done = 0
    started = time.perf_counter()
    while done < total:
        reply = client.xreadgroup(group, "c1", {stream: ">"}, count=1000, block=1000)
        if not reply:
            continue
        entries = reply[0][1]
        for _, fields in entries:
            json.loads(fields[b"data"])
        client.xack(stream, group, *[entry_id for entry_id, _ in entries])
        done += len(entries)
    elapsed = time.perf_counter() - started
    client.close()
    return total / elapsed


async def faststream_batch(redis_url: str, stream: str, total: int, max_records: int) -> float:
    """FastStream's batch subscriber with a handler that only counts."""
    from faststream.redis import RedisBroker, StreamSub

    client = redis.Redis.from_url(redis_url)
    group = "bench-faststream"
    client.xgroup_create(stream, group, id="0")
    client.close()
    broker = RedisBroker(redis_url, logger=None)
    finished = asyncio.Event()
    seen = 0

    @broker.subscriber(stream=StreamSub(stream, group=group, consumer="c1", batch=True, max_records=max_records,
                                        polling_interval=10))
    async def handle(messages: list[Any]) -> None:
        nonlocal seen
        seen += len(messages)
        if seen >= total:
            finished.set()

    started = time.perf_counter()
    await broker.start()
    await asyncio.wait_for(finished.wait(), timeout=max(60.0, total / 500))
    elapsed = time.perf_counter() - started
    await broker.stop()
    return total / elapsed


# (c) the full pipeline in process ------------------------------------------------------


def bench_settings(redis_url: str, database_url: str, rules_dir: Path, prefix: str, **extra: Any) -> Any:
    from decision_router.settings import Settings

    return Settings(
        redis_url=redis_url, database_url=database_url, rules_dir=rules_dir, stream_prefix=prefix,
        consumer_name="bench-1", batch_size=1000, drift_interval=timedelta(0), rules_poll_interval=timedelta(0),
        **extra,
    )


async def full_pipeline(redis_url: str, store: Store, rules_dir: Path, prefix: str, total: int,
                        profile: Path | None) -> tuple[float, dict[str, int]]:
    """The real service (running_service) over the backlog; returns (rate, what was stored)."""
    from decision_router.rules import load_rules
    from decision_router.service import collecting_for_batches, running_service

    settings = bench_settings(redis_url, store.url, rules_dir, prefix)
    ruleset = load_rules(rules_dir)
    engine = engine_for(store, background_checkpoints=True)  # as `serve` makes it
    client = redis.Redis.from_url(redis_url)
    stream = f"{prefix}predictions"
    profiler = None
    try:  # the engine (and its checkpoint thread) and the client closed even if the run fails
        if profile is not None:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="enabled")
            profiler.start()
        # As `serve` runs its service: start-up objects frozen, young collections rarer.
        with collecting_for_batches():
            started, cpu_started = time.perf_counter(), time.process_time()
            async with running_service(settings, ruleset, engine):
                while True:
                    # In a thread: a blocking call here would stall the service's event loop.
                    read, pending = await asyncio.to_thread(group_progress, client, stream, settings.consumer_group)
                    if read >= total and pending == 0:
                        break
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - started
                # CPU of this process (all its threads: the service, and on SQLite the store) per prediction:
                # steadier than the rate on a machine shared with other jobs.
                cpu = time.process_time() - cpu_started
        if profiler is not None:
            profiler.stop()
            assert profile is not None
            profile.write_text(profiler.output_text(unicode=False, show_all=False))
        stored = stored_counts(engine)
        stored["inbox_entries"] = sum(client.xlen(f"{prefix}alerts:{owner}") for owner in INBOX_OWNERS)
        stored["cpu_us"] = round(cpu / total * 1e6)
    finally:
        client.close()
        engine.dispose()
    return total / elapsed, stored


def stored_counts(engine: sqlalchemy.engine.Engine) -> dict[str, int]:
    with engine.connect() as connection:
        def count(sql: str) -> int:
            return int(connection.execute(sqlalchemy.text(sql)).scalar_one())

        return {
            "predictions": count("select count(*) from predictions"),
            "routed": count("select count(*) from alerts where action = 'alert' and not held_out "
                            "and suppressed_by is null"),
            "delivered": count("select count(*) from alerts where delivered_at is not null"),
            "held_out": count("select count(*) from alerts where held_out"),
            "recorded": count("select count(*) from alerts where action = 'record'"),
            "audit_events": count("select count(*) from audit_events"),
        }


# the router as a subprocess -------------------------------------------------------------


@contextlib.contextmanager
def router_processes(n: int, *, redis_url: str, store: Store, rules_dir: Path, prefix: str,
                     workdir: Path, extra_env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen]]:
    """n `decision-router serve` processes in one consumer group (distinct consumer names)."""
    env = {
        **os.environ,
        "DECISION_ROUTER_REDIS_URL": redis_url, "DECISION_ROUTER_DATABASE_URL": store.url,
        "DECISION_ROUTER_RULES_DIR": str(rules_dir), "DECISION_ROUTER_STREAM_PREFIX": prefix,
        "DECISION_ROUTER_BATCH_SIZE": "1000", "DECISION_ROUTER_LOG_LEVEL": "warning",
        "DECISION_ROUTER_DRIFT_INTERVAL": "0s", "DECISION_ROUTER_RULES_POLL_INTERVAL": "0s",
        **(extra_env or {}),
    }
    processes = []
    for i in range(n):
        log = open(workdir / f"router-{prefix.strip(':')}-{i}.log", "w")  # noqa: SIM115 (closed with the process)
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "decision_router", "serve", "--no-api"],
            env={**env, "DECISION_ROUTER_CONSUMER_NAME": f"bench-{i}"}, stdout=log, stderr=subprocess.STDOUT,
        ))
    client = redis.Redis.from_url(redis_url)
    try:
        # Ready when every consumer has registered in the group (its first XREADGROUP).
        deadline = time.monotonic() + 60
        while len(_consumers(client, f"{prefix}predictions", "decision-router")) < n:
            for p in processes:
                if p.poll() is not None:
                    raise RuntimeError(f"router exited with {p.returncode}; see {workdir}")
            if time.monotonic() > deadline:
                raise TimeoutError("router processes did not start in 60s")
            time.sleep(0.05)
        yield processes
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        client.close()


def _consumers(client: redis.Redis, stream: str, group: str) -> list[str]:
    try:
        return [_text(c["name"]) for c in client.xinfo_consumers(stream, group)]
    except redis.ResponseError:
        return []


def check_alive(processes: list[subprocess.Popen]) -> Callable[[], None]:
    def alive() -> None:
        for p in processes:
            if p.poll() is not None:
                raise RuntimeError(f"router exited with {p.returncode}")
    return alive


def batch_cycles(log_file: Path) -> str:
    """The router's batches as its log tells them ("batch routed" lines, JSON): how many, their
    size, and the time between one and the next (a batch's whole cycle: read, route, store,
    deliver, ack), whose long tail is the latency's."""
    batches = []
    for line in log_file.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "batch routed":
                batches.append((datetime.fromisoformat(event["timestamp"]), event["size"]))
    if len(batches) < 2:
        return f"{len(batches)} batch(es) logged"
    gaps = sorted((b[0] - a[0]).total_seconds() * 1000 for a, b in zip(batches, batches[1:], strict=False))
    long = sum(1 for g in gaps if g >= 40)
    return (f"{len(batches):,} batches of median {statistics.median(size for _, size in batches):.0f}; "
            f"one every {statistics.median(gaps):.1f} ms (median), p99 {gaps[int(len(gaps) * 0.99)]:.1f} ms, "
            f"max {gaps[-1]:.0f} ms; {long / len(gaps):.1%} of them 40 ms or more")


def latency(redis_url: str, store: Store, rules_dir: Path, prefix: str, workdir: Path, *,
            rate: float, seconds: float, batch_stats: bool = False) -> tuple[float, float, float, float, int]:
    """Publish at a steady `rate` and time each alert from XADD to its owner's inbox stream.
    Returns (p50 ms, p99 ms, Redis clock p50 ms, Redis clock p99 ms, alerts seen).

    Two clocks: this process's (XADD's reply to the reader's wake-up, which this process's own
    threads and the scheduler can delay), and Redis's own: the prediction's stream entry id and
    its alert's inbox entry id are the server's milliseconds at each XADD, the definition of
    "publish to alert in the owner's inbox" to the millisecond, with nothing of this process in
    it. `batch_stats`: the router logs each batch (info, JSON), and its batch cycle is printed
    (the log lines cost it a little)."""
    run = new_run_id()
    stream = f"{prefix}predictions"
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    sent_ms: dict[str, int] = {}
    arrived_ms: dict[str, int] = {}
    publishing = threading.Event()
    publishing.set()

    def read_inboxes() -> None:
        reader = redis.Redis.from_url(redis_url)
        ids = {f"{prefix}alerts:{owner}": "0-0" for owner in INBOX_OWNERS}
        quiet_since = None
        while True:
            reply = reader.xread(ids, count=1000, block=200)
            now = time.perf_counter()
            for name, entries in reply or []:
                for entry_id, fields in entries:
                    prediction_id = json.loads(fields[b"data"])["prediction_id"]
                    arrived.setdefault(prediction_id, now)
                    arrived_ms.setdefault(prediction_id, _entry_ms(entry_id))
                    ids[_text(name)] = _text(entry_id)
            if reply:
                quiet_since = None
            elif not publishing.is_set():
                quiet_since = quiet_since or now
                if now - quiet_since > 2.0:
                    break
        reader.close()

    log_env = {"DECISION_ROUTER_LOG_LEVEL": "info", "DECISION_ROUTER_LOG_FORMAT": "json"} if batch_stats else {}
    with router_processes(1, redis_url=redis_url, store=store, rules_dir=rules_dir, prefix=prefix, workdir=workdir,
                          extra_env=log_env):
        reader = threading.Thread(target=read_inboxes, daemon=True)
        reader.start()
        publisher = redis.Redis.from_url(redis_url)
        for n in paced(rate, seconds):
            doc = prediction(n, run, now=datetime.now(UTC))
            entry_id = publisher.xadd(stream, {"data": json.dumps(doc)})
            sent[doc["prediction_id"]] = time.perf_counter()
            sent_ms[doc["prediction_id"]] = _entry_ms(entry_id)
        publishing.clear()
        reader.join(timeout=60)
        publisher.close()
    if batch_stats:
        log_file = workdir / f"router-{prefix.strip(':')}-0.log"  # as router_processes names it
        print(f"  router batches: {batch_cycles(log_file)}", flush=True)
    delays = sorted((arrived[pid] - sent[pid]) * 1000 for pid in arrived if pid in sent)
    if not delays:
        raise RuntimeError("no alert reached an inbox")
    server = sorted(arrived_ms[pid] - sent_ms[pid] for pid in arrived_ms if pid in sent_ms)
    return (statistics.median(delays), _p99(delays), statistics.median(server), _p99(server), len(delays))


def _p99(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _entry_ms(entry_id: bytes | str) -> int:
    """The milliseconds part of a stream entry id: the Redis server's clock at its XADD."""
    return int(_text(entry_id).split("-", 1)[0])


def rss_run(redis_url: str, store: Store, rules_dir: Path, prefix: str, workdir: Path, *,
            total: int, chunk: int) -> tuple[float, float, float, float, float]:
    """Feed `total` predictions through one router process in chunks (the backlog stays
    bounded) while sampling its /proc status. Returns (rate, peak RSS MB, RSS MB after the
    first 10%, after half, at the end)."""
    run = new_run_id()
    stream = f"{prefix}predictions"
    client = redis.Redis.from_url(redis_url)
    samples: list[tuple[int, float]] = []  # (predictions published so far, VmRSS MB)
    peak = 0.0
    with router_processes(1, redis_url=redis_url, store=store, rules_dir=rules_dir, prefix=prefix, workdir=workdir,
                          extra_env={"DECISION_ROUTER_DEDUPE_TTL": "10m"}) as (process,):
        alive = check_alive([process])
        started = None
        published = 0
        now = datetime.now(UTC)
        while published < total:
            size = min(chunk, total - published)
            pipe = client.pipeline(transaction=False)
            for n in range(published, published + size):
                pipe.xadd(stream, {"data": json.dumps(prediction(n, run, now=now))})
            pipe.execute()
            published += size
            first, _ = wait_consumed(client, stream, "decision-router", published, timeout=600, alive=alive)
            started = started or first
            rss, hwm = _memory(process.pid)
            peak = max(peak, hwm)
            samples.append((published, rss))
            # Acknowledged entries and delivered alerts are not needed any more: keep Redis small.
            client.xtrim(stream, maxlen=0, approximate=False)
            for owner in INBOX_OWNERS:
                client.xtrim(f"{prefix}alerts:{owner}", maxlen=0, approximate=False)
            if published // chunk % 10 == 0:
                print(f"    rss run: {published:,} predictions, RSS {rss:.0f} MB", flush=True)
        elapsed = time.perf_counter() - (started or time.perf_counter())
    client.close()
    warm = next((rss for n, rss in samples if n >= total * 0.1), samples[0][1])
    half = next((rss for n, rss in samples if n >= total * 0.5), samples[0][1])
    return total / max(elapsed, 1e-9), peak, warm, half, samples[-1][1]


def _memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def scale_out(redis_url: str, store_for: Callable[[str], Store], rules_dir: Path, workdir: Path,
              total: int, processes: int) -> float:
    """Throughput of `processes` routers in one group over a backlog of `total`."""
    prefix = f"bench-{new_run_id()}:"
    client = redis.Redis.from_url(redis_url)
    store = store_for(f"scale{processes}")
    try:
        engine_for(store).dispose()  # the schema exists before the routers race to create it
        publish_backlog(client, f"{prefix}predictions", total, run=new_run_id())
        with router_processes(processes, redis_url=redis_url, store=store, rules_dir=rules_dir, prefix=prefix,
                              workdir=workdir) as routers:
            first, done = wait_consumed(client, f"{prefix}predictions", "decision-router", total, timeout=1800,
                                        alive=check_alive(routers))
        return total / max(done - first, 1e-9)
    finally:
        delete_prefix(client, prefix)
        client.close()
        store.drop()


# the run ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--redis-url", default=os.environ.get("DECISION_ROUTER_BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument("--postgres-url",
                        default=os.environ.get("DECISION_ROUTER_BENCH_POSTGRES_URL", DEFAULT_POSTGRES))
    parser.add_argument("--predictions", type=int, default=200_000, help="backlog for (a), (b), (c)")
    parser.add_argument("--rules", type=int, default=200, help="rules in all: the shipped ones plus generated")
    parser.add_argument("--rate", type=float, default=2000, help="offered rate of the latency part (per second)")
    parser.add_argument("--latency-seconds", type=float, default=20)
    parser.add_argument("--batch-stats", action="store_true",
                        help="latency part: the router logs its batches, and their cycle is printed")
    parser.add_argument("--rss-predictions", type=int, default=1_000_000)
    parser.add_argument("--scale-predictions", type=int, default=200_000)
    parser.add_argument("--faststream-batch", type=int, default=1000)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="a smoke run: every part scaled down (~2,000)")
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile of (c) to this file")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (databases, router logs)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run everything this many times; the table gives each figure's median and every run's")
    args = parser.parse_args(argv)
    if args.quick:
        args.predictions = min(args.predictions, 2000)
        args.rss_predictions = min(args.rss_predictions, 4000)
        args.scale_predictions = min(args.scale_predictions, 2000)
        args.latency_seconds = min(args.latency_seconds, 2.0)
        args.rate = min(args.rate, 500)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.parts = parts
    for name in ("predictions", "rss_predictions", "scale_predictions", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rules < 12:
        parser.error("--rules must be at least 12 (the shipped rules plus two generated ones)")
    return args


def check_services(args: argparse.Namespace) -> str | None:
    try:
        redis.Redis.from_url(args.redis_url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return f"cannot reach Redis at {redact_url(args.redis_url)}: {exc}"
    if args.store == "postgres" or "scaleout" in args.parts:
        try:
            engine = sqlalchemy.create_engine(args.postgres_url, connect_args={"connect_timeout": 3})
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("select 1"))
            engine.dispose()
        except sqlalchemy.exc.SQLAlchemyError as exc:
            return f"cannot reach PostgreSQL at {redact_url(args.postgres_url)}: {str(exc).splitlines()[0]}"
    return None


def run(args: argparse.Namespace) -> Report:
    import logging

    import structlog

    # The in-process service logs one line per batch; keep the benchmark's output readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="decision-router-bench-"))
    rules_dir = write_rules(workdir / "rules", args.rules)
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"bench-{new_run_id()}:"
    stream = f"{prefix}predictions"

    def store_for(name: str, kind: str | None = None) -> Store:
        return new_store(kind or args.store, workdir, args.postgres_url, name)

    print(f"decision-router benchmark: store {args.store}, {args.rules} rules, work files in {workdir}", flush=True)
    try:
        if {"bare", "faststream", "pipeline"} & set(args.parts):
            seconds = publish_backlog(client, stream, args.predictions, run=new_run_id())
            print(f"  published {args.predictions:,} predictions in {seconds:.1f}s", flush=True)
        if "bare" in args.parts:
            report.add("bare", "(a) bare redis-py loop", bare_loop(args.redis_url, stream, args.predictions), "/s")
        if "faststream" in args.parts:
            rate = asyncio.run(faststream_batch(args.redis_url, stream, args.predictions, args.faststream_batch))
            report.add("faststream", f"(b) FastStream batch subscriber ({args.faststream_batch})", rate, "/s")
        if "pipeline" in args.parts:
            store = store_for("pipeline")
            try:
                rate, stored = asyncio.run(
                    full_pipeline(args.redis_url, store, rules_dir, prefix, args.predictions, args.profile))
            finally:
                store.drop()
            n = stored["predictions"]
            mix = (f"{stored['routed'] / n:.0%} routed, {stored['held_out'] / n:.0%} held out, "
                   f"{stored['recorded'] / n:.0%} recorded; {stored['inbox_entries']:,} inbox entries")
            report.add("pipeline", f"(c) full pipeline, {args.store}", rate, "/s", mix)
            report.add("pipeline_cpu_us", "(c) router CPU per prediction", stored["cpu_us"], "us",
                       "this process, all threads" + (" (the store included)" if args.store == "sqlite" else ""))
            if stored["predictions"] != args.predictions or stored["delivered"] != stored["routed"]:
                raise RuntimeError(f"the pipeline did not store everything: {stored}")
            for key, base in (("bare", "a"), ("faststream", "b")):
                if key in report.figures:
                    report.add(f"c_{base}", f"c/{base}", rate / report.figures[key], "x")
        if "latency" in args.parts:
            store = store_for("latency")
            latency_prefix = f"bench-{new_run_id()}:"
            try:
                p50, p99, server_p50, server_p99, seen = latency(
                    args.redis_url, store, rules_dir, latency_prefix, workdir,
                    rate=args.rate, seconds=args.latency_seconds, batch_stats=args.batch_stats)
            finally:
                delete_prefix(client, latency_prefix)
                store.drop()
            note = f"{seen:,} alerts at {args.rate:,.0f}/s for {args.latency_seconds:g}s"
            report.add("latency_p50_ms", "end-to-end latency p50", p50, "ms", note)
            report.add("latency_p99_ms", "end-to-end latency p99", p99, "ms", note)
            redis_clock = "Redis's clock: the prediction's entry id to its alert's inbox entry id (1 ms steps)"
            report.add("latency_redis_p50_ms", "end-to-end latency p50, Redis clock", server_p50, "ms", redis_clock)
            report.add("latency_redis_p99_ms", "end-to-end latency p99, Redis clock", server_p99, "ms", redis_clock)
        if "rss" in args.parts:
            store = store_for("rss")
            rss_prefix = f"bench-{new_run_id()}:"
            try:
                rate, peak, warm, half, end = rss_run(args.redis_url, store, rules_dir, rss_prefix, workdir,
                                                total=args.rss_predictions,
                                                chunk=max(1000, min(50_000, args.rss_predictions // 20)))
            finally:
                delete_prefix(client, rss_prefix)
                store.drop()
            note = f"{args.rss_predictions:,} predictions through one `serve` process at {rate:,.0f}/s"
            report.add("rss_peak_mb", "router peak RSS (VmHWM)", peak, "MB", note)
            report.add("rss_growth_pct", "RSS growth after the first 10%", (end - warm) / warm * 100, "%",
                       f"{warm:.0f} MB -> {end:.0f} MB")
            # Caches (SQLite pages, prepared statements) fill early; a leak keeps growing.
            report.add("rss_growth_second_half_pct", "RSS growth over the second half", (end - half) / half * 100,
                       "%", f"{half:.0f} MB -> {end:.0f} MB")
        if "scaleout" in args.parts:
            def pg_store(name: str) -> Store:
                return store_for(name, "postgres")

            one = scale_out(args.redis_url, pg_store, rules_dir, workdir, args.scale_predictions, 1)
            two = scale_out(args.redis_url, pg_store, rules_dir, workdir, args.scale_predictions, 2)
            report.add("scale_1", "one router process, postgres", one, "/s")
            report.add("scale_2", "two router processes, postgres", two, "/s")
            report.add("scale_ratio", "two / one", two / one, "x")
        if "stats" in args.parts:
            stats_rows(report, args)
    except BaseException:
        print(f"  work files (router logs) kept in {workdir}", file=sys.stderr)
        raise
    else:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)  # SQLite files of a full run take gigabytes
    finally:
        delete_prefix(client, prefix)
        client.close()
    return report


def stats_rows(report: Report, args: argparse.Namespace) -> None:
    """`stats --by rule` over many alerts: benchmarks/bench_stats.py when it is there."""
    try:
        from benchmarks import bench_stats  # type: ignore[attr-defined]
    except ImportError:
        report.rows.append(Row("stats --by rule over 1,000,000 alerts", "not measured", "benchmarks/bench_stats.py"))
        return
    measure = getattr(bench_stats, "measure", None)
    if measure is None:
        report.rows.append(Row("stats --by rule", "see `python -m benchmarks.bench_stats`", ""))
        return
    for what, value, unit, note in measure(store=args.store, quick=args.quick, postgres_url=args.postgres_url):
        report.add(f"stats_{what}", what, value, unit, note)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_services(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    reports: list[Report] = []
    try:
        for i in range(args.repeat):
            if args.repeat > 1:
                print(f"run {i + 1} of {args.repeat}", flush=True)
            reports.append(run(args))
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: the benchmark failed: {exc}", file=sys.stderr)
        return 1
    report = medians(reports) if len(reports) > 1 else reports[0]
    print()
    print(report.table())
    targets = targets_table(report, args, len(reports))
    if targets:
        print()
        print(targets)
    print(f"\n({time.perf_counter() - started:.0f}s in all)")
    if args.json:
        figures: dict[str, Any] = dict(report.figures)
        if len(reports) > 1:
            figures["runs"] = [r.figures for r in reports]
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
