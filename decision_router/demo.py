"""`decision-router demo`: the simulator (decision_router/simulate.py) with its default world,
on the embedded Redis and a fresh SQLite file, printing the truth next to what was measured.

Synthetic churn predictions go through the real service (gate, rules, store, inboxes) over
14 simulated days; simulated account managers work their inboxes; a simulated CRM reports
renewals and churn by entity; the SLA sweeper escalates what nobody acted on. The world has a
known truth (an intervention effect, a control group), so the demo ends by showing the true
uplift beside the measured one, then the stats per rule.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from sqlmodel import Session

from decision_router.echo import counted
from decision_router.keys import Keys
from decision_router.settings import Settings, redact_url
from decision_router.simulate import RULE, WATCH_RULE, SimulationParams, run_simulation, write_rules
from decision_router.stats import GroupBy, StatsRow, compute_stats
from decision_router.store import make_engine

DEMO_DATABASE = "decision_router_demo.db"
DEMO_RULES = "decision_router_demo_rules"  # the simulated world's rules, kept beside the database for `stats`
DEMO_PREFIX = "demo:"


class DemoSetupError(Exception):
    """The demo cannot write its store or rules in the working directory."""


def _fresh_store() -> str:
    """A fresh demo store in the working directory (the last run's removed), as an absolute URL: the
    command shown at the end works from anywhere."""
    for suffix in ("", "-wal", "-shm"):
        Path(DEMO_DATABASE + suffix).unlink(missing_ok=True)
    return f"sqlite:///{Path(DEMO_DATABASE).resolve()}"


@dataclass(frozen=True)
class DemoResult:
    rows: list[StatsRow]
    by: GroupBy
    explore: str  # the `stats` command to run next: printed last, after the stats table


async def run_demo(
    settings: Settings, *, predictions: int, seed: int, database_url: str | None, console: Console
) -> DemoResult:
    """Run the default simulated world (`predictions` accounts) and return the stats per rule."""
    from decision_router.cli_simulate import print_result

    started = time.monotonic()
    params = SimulationParams(entities=predictions, seed=seed)
    # The files the demo leaves in the working directory, first: an unwritable one is said before the run,
    # not by a traceback (replacing the old store, or after the whole run, writing the rules).
    try:
        if database_url is None:
            database_url = _fresh_store()
        # The simulation's own rules live in a scratch directory, gone after the run: `stats` needs them (the
        # sample ratio check reads the holdouts), so they are written where the command shown finds them.
        rules_dir = Path(DEMO_RULES).resolve()
        write_rules(rules_dir, [params])
    except OSError as exc:
        where = f"{exc.strerror} ({exc.filename})"
        raise DemoSetupError(f"cannot write the demo's files in {Path.cwd()}: {where}") from None
    keys = Keys(DEMO_PREFIX)
    bad = round(params.entities * params.bad_input_rate)

    def on_start(url: str, prefix: str) -> None:
        console.print(
            f"publishing {counted(params.entities + bad, 'prediction')} over {counted(params.days, 'simulated day')} "
            f"to {keys.predictions} (embedded Redis at {url}); "
            f"{counted(params.total_days - params.days, 'more day')} for the CRM's results",
            markup=False, highlight=False, soft_wrap=True,
        )

    # Always the embedded Redis: the demo never writes to a configured server.
    result = await run_simulation(
        params, settings=settings, redis_url=None, database_url=database_url, stream_prefix=DEMO_PREFIX,
        on_start=on_start, read_every_day=False,
    )
    console.print(
        f"owners and the CRM recorded {counted(result.tally.events, 'event')} on {keys.outcomes}",
        markup=False, highlight=False, soft_wrap=True,
    )
    if result.measured is not None:
        console.print(
            f"SLA sweeps: {counted(result.measured.escalations, 'alert')} escalated to the team lead, "
            f"{counted(result.measured.sla_breaches, 'SLA breach', 'SLA breaches')} at the top of the chain",
            markup=False, highlight=False, soft_wrap=True,
        )
    console.print(
        "quality gate rejected: "
        + (", ".join(f"{reason} {n}" for reason, n in sorted(result.rejected.items())) or "nothing")
        + f" (see {keys.predictions_dlq})",
        markup=False, highlight=False, soft_wrap=True,
    )
    print_result(result, console)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            rows = compute_stats(session, by=GroupBy.RULE, holdouts={RULE: params.holdout, WATCH_RULE: 0.0})
    finally:
        engine.dispose()
    console.print(
        f"demo finished in {time.monotonic() - started:.1f}s; store: {redact_url(database_url)}", markup=False, highlight=False
    )
    explore = (
        f"explore it: DECISION_ROUTER_DATABASE_URL={shlex.quote(redact_url(database_url))} "
        f"DECISION_ROUTER_RULES_DIR={shlex.quote(str(rules_dir))} decision-router stats --by owner"
    )
    return DemoResult(rows=rows, by=GroupBy.RULE, explore=explore)
