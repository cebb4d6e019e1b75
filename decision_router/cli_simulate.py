"""`decision-router simulate`: a world with a known truth, through the real pipeline.

The world and its truth are described in decision_router/simulate.py. This module parses the
options, runs the simulation and prints the truth next to what the stats reported. It is
registered on the CLI's `app` (cli_common.py) when imported; cli.py imports it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from decision_router.cli_common import (
    MAX_SIMULATED_ENTITIES,
    app,
    err,
    fail,
    fail_store,
    out,
    run_interruptibly,
    settings_or_exit,
)
from decision_router.echo import counted

if TYPE_CHECKING:  # simulate.py pulls in the whole service (monitor, notify, channels, httpx): imported when run
    from decision_router.simulate import SimulationResult


MAX_DAYS = 365  # a year of predictions; each simulated day is a round of the service (~0.2 s here)


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f} pts"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _hours(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 3600:.1f}h"


def _interval(low: float | None, high: float | None, has_control: bool) -> str:
    if low is None or high is None:
        # As `stats` says it: without a holdout, more accounts would not give the rule a control group.
        return "not enough data" if has_control else "no control group"
    return f"[{low * 100:+.1f}, {high * 100:+.1f}]"


def describe(result: SimulationResult) -> str:
    p = result.params
    drift = f", scores drift +{p.drift_shift:g} from day {p.drift_from_day}" if p.drift_from_day is not None else ""
    return (
        f"simulated {counted(p.days, 'day')} of predictions and {p.total_days - p.days} of follow-up: "
        f"{counted(p.entities, 'account')}, "
        f"seed {p.seed}, rule churn-risk on score >= {p.threshold:g} with holdout {p.holdout:.0%}, "
        f"intervention effect {p.effect:+g}{drift}"
    )


def print_result(result: SimulationResult, console: Console | None = None) -> None:
    """The truth next to the stats, as tables."""
    console = console or out
    truth, tally, measured = result.truth, result.tally, result.measured
    console.print(describe(result), markup=False, highlight=False, soft_wrap=True)

    table = Table(title="truth vs measured (rule churn-risk)", title_justify="left")
    for header in ("", "truth", "simulated log", "stats reported"):
        table.add_column(header, justify="left" if not header else "right")
    m = measured
    table.add_row(
        "uplift (treated - control)", _points(truth.uplift),
        _points(_difference(
            tally.treated_successes, tally.treated_failures, tally.control_successes, tally.control_failures
        )),
        _points(m.uplift if m else None),
    )
    table.add_row(
        "  fixed 95% interval", "", "", _interval(m.uplift_ci_low, m.uplift_ci_high, m.has_control) if m else "n/a"
    )
    table.add_row(
        "  always-valid 95% interval", "", "",
        _interval(m.uplift_seq_low, m.uplift_seq_high, m.has_control) if m else "n/a",
    )
    table.add_row(
        "treated success", _rate(truth.treated_success_probability),
        _rate(_share(tally.treated_successes, tally.treated_failures)),
        _rate(m.treated_success_rate if m else None),
    )
    table.add_row(
        "control success", _rate(truth.control_success_probability),
        _rate(_share(tally.control_successes, tally.control_failures)),
        _rate(m.control_success_rate if m else None),
    )
    table.add_row(
        "treated / control with a result", "",
        f"{tally.treated_successes + tally.treated_failures} / {tally.control_successes + tally.control_failures}",
        f"{m.treated_n} / {m.control_n}" if m else "n/a",
    )
    table.add_row(
        "alerts acted on", _rate(truth.intervention_probability),
        _rate(_share(sum(o.intervened for o in result.owners), sum(o.alerts - o.intervened for o in result.owners))),
        _rate(m.intervention_rate if m else None),
    )
    table.add_row(
        "routed / held out", "", f"{tally.treated} / {tally.control}", f"{m.routed} / {m.held_out}" if m else "n/a"
    )
    console.print(table)

    owners = Table(title="owners: configured, simulated, and what the stats reported", title_justify="left")
    for header in (
        "owner", "alerts", "act rate\nconfigured", "act rate\nsimulated", "act rate\nstats",
        "median to act\nsimulated", "median to act\nstats", "median to ack\nsimulated", "median to ack\nstats",
    ):
        owners.add_column(header, justify="left" if header == "owner" else "right")
    for o in result.owners:
        row = result.measured_owner(o.owner)
        owners.add_row(
            Text(o.owner), str(o.alerts), _rate(o.p_act), _rate(o.intervention_rate),
            _rate(row.intervention_rate if row else None),
            _hours(o.median_time_to_act_s), _hours(row.median_time_to_act_s if row else None),
            _hours(o.median_time_to_ack_s), _hours(getattr(row, "median_time_to_ack_s", None) if row else None),
        )
    console.print(owners)
    console.print(_precision_table(result))

    lines = [
        (
            "truth: q x E[effect on the success probability | the rule matches], q = P(an alert is acted on) from "
            "the owners' configured behaviour; simulated log: the simulator's own record of what happened; stats: "
            "decision_router.stats read from the store."
        ),
        (
            "model precision: of the held-out accounts nobody acted on, the share that churned; held out, with "
            "result, churned: one number when the log and the stats agree, else log / stats; true precision: the "
            "band's mean true churn risk, which its 95% interval should contain."
        ),
    ]
    if m is not None and m.uplift_ci_low is not None:
        inside = m.uplift_ci_low <= truth.uplift <= m.uplift_ci_high
        lines.append(
            f"the fixed 95% interval {'contains' if inside else 'misses'} the true uplift "
            f"({'as it should in 95% of worlds' if inside else 'which a 95% interval does in 1 world of 20'})."
        )
    if not result.drift_checked:
        lines.append("drift: not checked")
    elif result.params.drift_from_day is not None:
        found = result.drift_detected_day
        lines.append(
            f"drift: injected from day {result.params.drift_from_day}; "
            + (f"the monitor flagged the score on day {found}" if found is not None else "the monitor did not flag it")
        )
    else:
        lines.append(
            "drift: none injected; "
            + ("nothing flagged" if not result.flagged_days else f"flagged on days {result.flagged_days} (false alarm)")
        )
    rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(result.rejected.items())) or "nothing"
    lines.append(f"quality gate rejected: {rejected} (of {counted(tally.bad_inputs, 'bad input')} injected)")
    if m is not None:
        escalations, breaches = counted(m.escalations, "escalation"), counted(m.sla_breaches, "breach", "breaches")
        lines.append(f"SLA: {escalations} to the team lead, {breaches}")
    lines.append(
        f"{counted(tally.published_predictions, 'prediction')} and {counted(tally.events, 'owner and CRM event')} "
        f"in {result.elapsed_s:.1f}s"
    )
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    print_checks(result, console)


def _pair(simulated: int, measured: int | None) -> str:
    """'log / stats', or the one number when they agree."""
    return str(simulated) if simulated == measured else f"{simulated} / {'n/a' if measured is None else measured}"


def _precision_table(result: SimulationResult) -> Table:
    """`stats model` beside the simulator's record, for the bands that hold any control account."""
    table = Table(
        title="model precision by score band (stats model): simulated log vs stats", title_justify="left"
    )
    for header in (
        "score band", "held out", "with result", "churned", "true\nprecision", "stats\nprecision", "95% CI", "contains",
    ):
        table.add_column(header, justify="left" if header == "score band" else "right")
    for band in result.precision.bands:
        s, m = band.simulated, band.measured
        if s.held_out == 0 and band.counts_equal:
            continue  # an empty band (below the rule's threshold, say): nothing to compare
        covered = {None: "", True: "yes", False: "NO"}[band.covered]
        table.add_row(
            f"{s.band_low:g}-{s.band_high:g}", _pair(s.held_out, m.held_out if m else None),
            _pair(s.n, m.n if m else None), _pair(s.positives, m.positives if m else None),
            _rate(s.true_precision), _rate(m.precision if m else None),
            _ci(m.ci_low, m.ci_high) if m else "n/a", covered,
        )
    return table


def _ci(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"{low:.0%}-{high:.0%}"


def print_checks(result: SimulationResult, console: Console) -> None:
    """One line per check; `simulate` exits 1 when one fails."""
    lines = ["checks:"]
    for check in result.checks():
        lines.append(f"  {'pass' if check.passed else 'FAIL'}: {check.name}: {check.detail}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _share(yes: int, no: int) -> float | None:
    return yes / (yes + no) if yes + no else None


def _difference(ts: int, tf: int, cs: int, cf: int) -> float | None:
    treated, control = _share(ts, tf), _share(cs, cf)
    return None if treated is None or control is None else treated - control


@app.command()
def simulate(
    days: Annotated[int, typer.Option(min=1, max=MAX_DAYS, help="Days on which predictions are published.")] = 14,
    entities: Annotated[
        int, typer.Option(min=1, max=MAX_SIMULATED_ENTITIES, help="Accounts scored, spread evenly over the days.")
    ] = 2000,
    effect: Annotated[float, typer.Option(help="Change of an intervened account's success probability.")] = 0.1,
    holdout: Annotated[float, typer.Option(help="The rule's control-group fraction.")] = 0.3,
    threshold: Annotated[float, typer.Option(help="The rule alerts on score >= threshold.")] = 0.5,
    drift_from_day: Annotated[
        int | None, typer.Option(min=0, max=MAX_DAYS, help="Shift the model's scores from this day (0-based) on.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same world.")] = 7,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    database: Annotated[
        str | None, typer.Option(help="Keep the store at this database URL (default: a temporary SQLite file).")
    ] = None,
    redis: Annotated[
        str | None, typer.Option(help="Run on this Redis (a fresh stream prefix, removed after); default: embedded.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the service's per-batch log lines.")] = False,
) -> None:
    """Simulate a world with a known truth through the real pipeline; print the truth next to the stats."""
    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.redis_client import REDIS_ERRORS
    from decision_router.settings import redact_text, redact_url
    from decision_router.simulate import SimulationParams, run_simulation

    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, not {fmt!r}", code=2)
    # The result summarises the monitor's data-quality alerts; -v shows them (and every batch) as they happen.
    # --database and --redis are checked (and normalised) as their variables are.
    settings = settings_or_exit(
        log_level=None if verbose else "error",
        options={"--database": ("database_url", database), "--redis": ("redis_url", redis)},
    )
    database = settings.database_url if database is not None else None
    redis = settings.redis_url if redis is not None else None
    try:
        params = replace(
            SimulationParams(), days=days, entities=entities, effect=effect, holdout=holdout, threshold=threshold,
            drift_from_day=drift_from_day, seed=seed,
        )
    except ValueError as exc:
        fail(str(exc), code=2)
    progress = err

    def on_day(day: int, now: Any) -> None:
        if progress.is_terminal:
            progress.print(f"day {day + 1}/{params.total_days} ({now:%Y-%m-%d})", end="\r", highlight=False)

    try:
        # As `demo`: with asyncio.run, a Ctrl-C whose cancellation was lost (under load, in some await of
        # the run) let the simulation go on to its end, 11-49 s later, and exit 0.
        result = run_interruptibly(
            run_simulation(params, settings=settings, redis_url=redis, database_url=database, on_day=on_day)
        )
    except SQLAlchemyError as exc:
        fail_store(database or "a temporary SQLite file", exc)
    except REDIS_ERRORS as exc:
        where = f"Redis at {redact_url(redis)}" if redis else "the embedded Redis"
        fail(f"cannot reach {where}: {redact_text(str(exc))}")
    if fmt == "json":
        sys.stdout.write(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
    else:
        print_result(result)
        if database is not None:
            out.print(f"store kept: {redact_url(database)}", markup=False, highlight=False, soft_wrap=True)
    failed = [check.name for check in result.checks() if not check.passed]
    if failed:
        fail(f"{counted(len(failed), 'check')} failed: {'; '.join(failed)}")
