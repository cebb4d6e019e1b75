"""The benchmark harness runs end to end on a small backlog (no timing assertions: speed is
shown by the figures it prints, see README "Performance")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_completes_with_positive_figures(redis_server, postgres_server, tmp_path) -> None:
    figures_file = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--store", "sqlite", "--redis-url", redis_server,
         "--postgres-url", postgres_server, "--parts", "bare,faststream,pipeline,latency,rss,scaleout",
         "--json", str(figures_file), "--batch-stats"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(figures_file.read_text())
    for key in ("bare", "faststream", "pipeline", "c_a", "c_b", "latency_p50_ms", "latency_p99_ms",
                "rss_peak_mb", "scale_1", "scale_2", "scale_ratio"):
        assert figures[key] > 0, (key, figures)
    assert figures["latency_p99_ms"] >= figures["latency_p50_ms"]
    # On Redis's clock too: whole milliseconds between a prediction's entry and its alert's.
    assert figures["latency_redis_p99_ms"] >= figures["latency_redis_p50_ms"] >= 0
    redis_p99 = figures["latency_redis_p99_ms"]
    assert redis_p99 > 0 and redis_p99 == int(redis_p99)
    # The latency part's router logged its batches, and their cycle was read back from its log.
    assert "  router batches: " in done.stdout and " batches of median " in done.stdout, done.stdout
    assert "| (c) full pipeline, sqlite" in done.stdout and "% routed, " in done.stdout


def test_bad_options_are_one_line_errors() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--parts", "bare,warp"], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 2 and "unknown part(s) warp" in done.stderr and "Traceback" not in done.stderr
    unreachable = subprocess.run([sys.executable, "-m", "benchmarks.run", "--redis-url", "redis://127.0.0.1:1/0"],
                                 cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)
    assert unreachable.returncode == 2 and "cannot reach Redis at redis://127.0.0.1:1/0" in unreachable.stderr


def test_repeated_runs_report_each_figures_median_and_the_targets(redis_server, tmp_path) -> None:
    figures_file = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--repeat", "3", "--store", "sqlite",
         "--redis-url", redis_server, "--parts", "bare,pipeline", "--json", str(figures_file)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(figures_file.read_text())
    assert len(figures["runs"]) == 3
    for key in ("bare", "pipeline", "c_a"):
        runs = sorted(run[key] for run in figures["runs"])
        assert figures[key] == runs[1], (key, figures)  # the median of three
    assert "run 3 of 3" in done.stdout
    pipeline_row = next(line for line in done.stdout.splitlines() if line.startswith("| (c) full pipeline, sqlite"))
    runs_shown = pipeline_row.split("runs: ", 1)[1].split(";", 1)[0]
    assert len(runs_shown.split(", ")) == 3, pipeline_row  # "3,947, 3,495, 3,612": thousands have no space
    c_a = figures["c_a"]
    verdict = "met" if c_a >= 0.5 else "NOT MET"
    target_row = next(line for line in done.stdout.splitlines() if line.startswith("| c/a >= 0.5"))
    assert target_row.rstrip(" |").endswith(verdict), target_row
    assert "median of 3" in done.stdout
    assert "(not the issue's conditions: --quick scales every part down; (c) over 2,000, not 200,000)" in done.stdout


def test_stages_split_a_small_batch_into_its_parts_and_leave_the_pipeline_as_it_was() -> None:
    from sqlalchemy.orm import Session

    from benchmarks.stages import PARTS, measure
    from decision_router import cooldowns, tracker

    before = (tracker.known_predictions, tracker.insert_rows, tracker.mark_delivered, cooldowns.holders,
              cooldowns.claim, Session.commit)
    figures = measure("sqlite", 3, "", batch=20, parts=True)
    stages = ("gate", "document and routing", "store", "inbox JSON", "mark delivered")
    for stage in stages:
        cpu_us, wall_ms = figures[stage]
        assert cpu_us is not None and cpu_us > 0 and wall_ms > 0, (stage, figures[stage])
    # Each part is reported under the step that called it, with its wall time per batch.
    store_parts = {label for _, _, label in PARTS} - {"UPDATE delivered, its audit rows"}
    assert {f"store / {label}" for label in store_parts} <= set(figures), sorted(figures)
    assert {"mark delivered / UPDATE delivered, its audit rows", "mark delivered / commit"} <= set(figures)
    assert not any(key.startswith(("gate /", "inbox JSON /")) for key in figures)
    assert all(figures[key][0] is None and figures[key][1] > 0 for key in figures if " / " in key)
    after = (tracker.known_predictions, tracker.insert_rows, tracker.mark_delivered, cooldowns.holders,
             cooldowns.claim, Session.commit)
    assert after == before  # the wrappers are gone
