"""`simulate`'s checks through the real pipeline, on the embedded fakeredis: a correct run passes
them, and a `stats model` that counts wrongly fails them (and `simulate` exits 1).

One small world is run once with its store kept; each broken precision computation is then read
from that store, as the simulator reads the correct one. The world has owners acting on some
held-out accounts anyway (control_act_rate), which `stats model` must leave out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from decision_router import stats
from decision_router.simulate import SimulationParams, SimulationResult, run_simulation
from decision_router.stats import BandRow
from decision_router.store import make_engine
from decision_router.uplift import DEFAULT_BAND_EDGES

WORLD = SimulationParams(days=4, entities=400, seed=21, holdout=0.4, control_act_rate=0.25)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimulationResult, str]]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("DECISION_ROUTER_REDIS_URL", "DECISION_ROUTER_DATABASE_URL"):
            patch.delenv(name, raising=False)
        url = f"sqlite:///{tmp_path_factory.mktemp('sim') / 'store.db'}"
        result = asyncio.run(run_simulation(WORLD, database_url=url, check_drift=False))
        yield result, url


def _read(url: str, compute: Callable[..., list[BandRow]]) -> list[BandRow]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return compute(session, model=WORLD.model, edges=DEFAULT_BAND_EDGES)
    finally:
        engine.dispose()


def _failed(result: SimulationResult) -> set[str]:
    return {check.name for check in result.checks() if not check.passed}


def _swap_positives(rows: list[BandRow]) -> list[BandRow]:
    """Churned counted as renewed and back: the convention of `failure` = positive turned round."""
    return [
        replace(row, positives=row.n - row.positives,
                precision=None if row.precision is None else 1 - row.precision,
                ci_low=None if row.ci_high is None else 1 - row.ci_high,
                ci_high=None if row.ci_low is None else 1 - row.ci_low)
        for row in rows
    ]


def test_a_correct_run_passes_every_check(world) -> None:
    result, _ = world
    assert result.passed, [(c.name, c.detail) for c in result.checks()]
    check = result.precision
    assert check.counts_equal and check.judged >= 4  # the bands at and above the 0.5 threshold
    # ...and some held-out accounts were acted on, so leaving them out is part of what was proven.
    touched = result.tally.control - sum(band.held_out for band in result.precision_log)
    assert touched >= 10, touched


def test_counting_controls_someone_acted_on_fails_the_counts(world, monkeypatch: pytest.MonkeyPatch) -> None:
    result, url = world

    def ignores_interventions(decisions: Any, live: Any) -> bool:
        return not any(d.action == "alert" and not d.held_out for d in live)

    monkeypatch.setattr(stats, "_left_alone", ignores_interventions)
    broken = replace(result, measured_precision=_read(url, stats.compute_model_precision))
    assert "model precision counts equal the simulated log" in _failed(broken)


def test_swapped_positives_fail_the_counts_and_the_intervals(world) -> None:
    result, url = world
    broken = replace(result, measured_precision=_swap_positives(_read(url, stats.compute_model_precision)))
    assert _failed(broken) == {
        "model precision counts equal the simulated log", "model precision intervals contain the true precision",
    }


def test_intervals_that_are_too_narrow_fail_the_interval_check_alone(world) -> None:
    """Right counts, but an interval collapsed onto the estimate: only the calibration check sees it."""
    result, url = world
    rows = _read(url, stats.compute_model_precision)
    rows = [replace(row, ci_low=row.precision, ci_high=row.precision) for row in rows]
    broken = replace(result, measured_precision=rows)
    assert _failed(broken) == {"model precision intervals contain the true precision"}


def test_simulate_exits_1_when_a_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from decision_router import cli_simulate, simulate  # noqa: F401  cli_simulate registers `simulate` on the app
    from decision_router.cli import app

    runner = CliRunner()
    args = ["simulate", "--days", "2", "--entities", "200", "--seed", "3"]
    passed = runner.invoke(app, [*args, "--format", "json"])
    assert passed.exit_code == 0, passed.output
    document = json.loads(passed.stdout)
    assert document["passed"] is True and all(check["passed"] for check in document["checks"])
    assert document["precision"]["counts_equal"] and document["precision"]["bands_judged"] >= 4

    def swapped(*call: Any, **options: Any) -> list[BandRow]:
        return _swap_positives(stats.compute_model_precision(*call, **options))

    monkeypatch.setattr(simulate, "compute_model_precision", swapped)
    failed = runner.invoke(app, [*args, "--format", "json"])
    assert failed.exit_code == 1
    document = json.loads(failed.stdout)  # the whole report still comes, then the one-line error
    assert document["passed"] is False and document["precision"]["counts_equal"] is False
    assert "error: 2 checks failed: model precision counts equal the simulated log" in failed.stderr
    table = runner.invoke(app, args)
    assert table.exit_code == 1
    assert "FAIL: model precision counts equal the simulated log" in table.stdout
    assert "Traceback" not in table.output


def test_a_world_without_a_holdout_passes_and_says_there_is_no_control_group() -> None:
    """--holdout 0: `stats model` has no row (no control prediction), which is what the log says, and the
    uplift lacks a control group, not data: more accounts would not give it one."""
    from decision_router import cli_simulate  # noqa: F401  cli_simulate registers `simulate` on the app
    from decision_router.cli import app

    result = CliRunner().invoke(app, ["simulate", "--days", "1", "--entities", "60", "--holdout", "0"])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.stdout
    uplift_rows = [line for line in result.stdout.splitlines() if line.lstrip("│ ").startswith(("fixed 95% interval", "always-valid 95% interval"))]
    assert len(uplift_rows) == 2 and all("no control group" in line for line in uplift_rows), uplift_rows
