"""`python -m benchmarks.stages [--store sqlite|postgres] [--batch N] [--parts]`: what each stage of the
pipeline costs, run one after the other on one thread, on batches of the benchmark's predictions
(benchmarks/workload.py, 200 rules): CPU per prediction, the least of several batches (the figure least
disturbed by other jobs on the machine), and the median wall time per batch. No Redis is touched: the
inbox write is timed up to the JSON it would send. The "Where the time goes" table of the README comes
from here with batches of 1,000. `--batch 20` is about what a batch holds at 2,000 predictions/s, where
what a batch costs whatever its size sets the cycle; `--parts` splits the store and mark steps into their
reads, inserts and commits (wall time per batch: on PostgreSQL most of it is the server's).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.run import DEFAULT_POSTGRES, new_store
from benchmarks.workload import new_run_id, prediction, write_rules

BATCH = 1000
# The steps' parts (--parts): (module, attribute path, label), each timed wherever the pipeline calls it.
PARTS = (
    ("decision_router.tracker", "known_predictions", "read: prediction ids already stored"),
    ("decision_router.cooldowns", "holders", "read: cooldowns in force"),
    ("decision_router.cooldowns", "claim", "cooldown windows claimed"),
    ("decision_router.tracker", "insert_rows", "inserts (3 tables)"),
    ("decision_router.tracker", "mark_delivered", "UPDATE delivered, its audit rows"),
    ("sqlalchemy.orm", "Session.commit", "commit"),
)


@contextmanager
def timing_parts(spent: dict[tuple[str, str], list[float]], stage: list[str]) -> Iterator[None]:
    """Wrap PARTS so that each call adds its wall time (seconds) to spent[(stage[0], label)]."""
    undo = []
    for module_name, path, label in PARTS:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, name)

        def timed(*args: Any, _original: Callable = original, _label: str = label, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent.setdefault((stage[0], _label), []).append(time.perf_counter() - started)

        setattr(owner, name, timed)
        undo.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in undo:
            setattr(owner, name, original)


def measure(store: str, batches: int, postgres_url: str, *, batch: int = BATCH,
            parts: bool = False) -> dict[str, tuple[float | None, float]]:
    """stage (or "stage / part") -> (CPU µs per prediction, the least of the batches, None for a part;
    median wall ms per batch)."""
    from decision_router.delivery import inbox_writes
    from decision_router.pipeline import Pipeline
    from decision_router.rules import load_rules
    from decision_router.settings import Settings
    from decision_router.store import create_schema, make_engine

    work = Path(tempfile.mkdtemp(prefix="decision-router-stages-"))
    rules_dir = write_rules(work / "rules", 200)
    store_of_run = new_store(store, work, postgres_url, "stages")
    url = store_of_run.url
    engine = make_engine(url)
    try:
        create_schema(engine)
        ruleset = load_rules(rules_dir)
        settings = Settings(redis_url="redis://127.0.0.1:6379/0", database_url=url, rules_dir=rules_dir,
                            stream_prefix="stages:")
        pipeline = Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=None)  # type: ignore[arg-type]
        cpu: dict[str, list[float]] = {}
        wall: dict[str, list[float]] = {}
        spent: dict[tuple[str, str], list[float]] = {}
        stage = [""]

        def timed(name: str, work: Callable[[], Any]) -> Any:
            stage[0] = name
            started, started_cpu = time.perf_counter(), time.process_time()
            result = work()
            cpu.setdefault(name, []).append(time.process_time() - started_cpu)
            wall.setdefault(name, []).append(time.perf_counter() - started)
            return result

        with timing_parts(spent, stage) if parts else nullcontext():
            for _number in range(batches):
                run, now = new_run_id(), datetime.now(UTC)
                # Entry ids as Redis makes them: the time of XADD, after the prediction's (as in a real stream,
                # where the pipeline looks up earlier rejections only for predictions stamped later).
                added_ms = int(now.timestamp() * 1000) + 1
                entries = [(f"{added_ms}-{n}", {"data": json.dumps(prediction(n, run, now=now))})
                           for n in range(batch)]
                checked = timed("gate", lambda: [(e, f, pipeline._check(e, f, now)) for e, f in entries])  # noqa: B023
                early = timed("document and routing",
                              lambda: [pipeline._route_early(item, ruleset, now) for _, _, item in checked])  # noqa: B023
                _, _, fresh, _ = timed(
                    "store", lambda: pipeline._store_predictions(  # noqa: B023
                        checked, early, ruleset, now, {}, pipeline._stale_ids(checked, now)))  # noqa: B023
                timed("inbox JSON", lambda: inbox_writes(fresh, pipeline.keys))  # noqa: B023
                timed("mark delivered", lambda: pipeline._mark_delivered(fresh))  # noqa: B023
        figures: dict[str, tuple[float | None, float]] = {}
        for name, times in cpu.items():
            figures[name] = (min(times) / batch * 1e6, statistics.median(wall[name]) * 1e3)
            for (part_stage, label), calls in spent.items():
                if part_stage == name:  # one call per batch (a batch without cooldowns claims none)
                    figures[f"{name} / {label}"] = (None, statistics.median(calls) * 1e3)
        return figures
    finally:
        engine.dispose()
        store_of_run.drop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--batches", type=int, default=9, help="batches to run (default 9)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"predictions per batch (default {BATCH})")
    parser.add_argument("--parts", action="store_true", help="split the store and mark steps into their parts")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch < 1:
        parser.error("--batches and --batch must be at least 1")
    print(f"{'stage':50s} {'CPU per prediction':>20s} {'wall per batch':>16s}   (batches of {args.batch:,})")
    for name, (us, ms) in measure(args.store, args.batches, args.postgres_url, batch=args.batch,
                                  parts=args.parts).items():
        shown = f"{us:9.1f} µs" if us is not None else ""
        print(f"{name:50s} {shown:>20s} {ms:12.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
