"""`python -m benchmarks.stages [--store sqlite|postgres]`: CPU per prediction of each stage of the
pipeline, run one after the other on one thread, on batches of 1,000 of the benchmark's predictions
(benchmarks/workload.py, 200 rules). The least of several batches per stage, as the figure least
disturbed by other jobs on the machine. No Redis is touched: the inbox write is timed up to the
JSON it would send. The "Where the time goes" table of the README comes from here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.run import DEFAULT_POSTGRES, new_store
from benchmarks.workload import new_run_id, prediction, write_rules

BATCH = 1000


def measure(store: str, batches: int, postgres_url: str) -> dict[str, float]:
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
        spent: dict[str, list[float]] = {}

        def timed(stage: str, work: Callable[[], Any]) -> Any:
            started = time.process_time()
            result = work()
            spent.setdefault(stage, []).append(time.process_time() - started)
            return result

        for batch in range(batches):
            run, now = new_run_id(), datetime.now(UTC)
            entries = [(f"{batch}-{n}", {"data": json.dumps(prediction(n, run, now=now))}) for n in range(BATCH)]
            checked = timed("gate", lambda: [(e, f, pipeline._check(e, f, now)) for e, f in entries])  # noqa: B023
            early = timed("document and routing",
                          lambda: [pipeline._route_early(item, ruleset, now) for _, _, item in checked])  # noqa: B023
            _, _, fresh, _ = timed("store", lambda: pipeline._store_predictions(checked, early, ruleset, now, {}))  # noqa: B023
            timed("inbox JSON", lambda: inbox_writes(fresh, pipeline.keys))  # noqa: B023
            timed("mark delivered", lambda: pipeline._mark_delivered(fresh))  # noqa: B023
        return {stage: min(times) / BATCH * 1e6 for stage, times in spent.items()}
    finally:
        engine.dispose()
        store_of_run.drop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--batches", type=int, default=9)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    args = parser.parse_args(argv)
    for stage, us in measure(args.store, args.batches, args.postgres_url).items():
        print(f"{stage:22s} {us:6.1f} µs per prediction")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
