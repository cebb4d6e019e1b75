"""`decision-router demo`: the simulator (decision_router/simulate.py) with its default world,
on the embedded Redis and a fresh SQLite file, printing the truth next to what was measured.

Synthetic churn predictions go through the real service (gate, rules, store, inboxes) over
14 simulated days; simulated account managers work their inboxes; a simulated CRM reports
renewals and churn by entity; the SLA sweeper escalates what nobody acted on. The world has a
known truth (an intervention effect, a control group), so the demo ends by showing the true
uplift beside the measured one, then the stats per rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from sqlmodel import Session

from decision_router.keys import Keys
from decision_router.settings import Settings, redact_url
from decision_router.simulate import RULE, WATCH_RULE, SimulationParams, run_simulation
from decision_router.stats import GroupBy, StatsRow, compute_stats
from decision_router.store import make_engine

DEMO_DATABASE = "decision_router_demo.db"
DEMO_PREFIX = "demo:"


@dataclass(frozen=True)
class DemoResult:
    rows: list[StatsRow]
    by: GroupBy


async def run_demo(
    settings: Settings, *, predictions: int, seed: int, database_url: str | None, console: Console
) -> DemoResult:
    """Run the default simulated world (`predictions` accounts) and return the stats per rule."""
    from decision_router.cli_simulate import print_result

    started = time.monotonic()
    if database_url is None:
        Path(DEMO_DATABASE).unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(DEMO_DATABASE + suffix).unlink(missing_ok=True)
        database_url = f"sqlite:///{DEMO_DATABASE}"
    params = SimulationParams(entities=predictions, seed=seed)
    keys = Keys(DEMO_PREFIX)
    bad = round(params.entities * params.bad_input_rate)

    def on_start(url: str, prefix: str) -> None:
        console.print(
            f"publishing {params.entities + bad} predictions over {params.days} simulated days to {keys.predictions} "
            f"(embedded Redis at {url}); {params.total_days - params.days} more days for the CRM's results",
            markup=False, highlight=False, soft_wrap=True,
        )

    # Always the embedded Redis: the demo never writes to a configured server.
    result = await run_simulation(
        params, settings=settings, redis_url=None, database_url=database_url, stream_prefix=DEMO_PREFIX,
        on_start=on_start, read_every_day=False,
    )
    console.print(
        f"owners and the CRM recorded {result.tally.events} events on {keys.outcomes}",
        markup=False, highlight=False, soft_wrap=True,
    )
    if result.measured is not None:
        console.print(
            f"SLA sweeps: {result.measured.escalations} alerts escalated to the team lead, "
            f"{result.measured.sla_breaches} SLA breaches at the top of the chain",
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
    console.print(
        f"explore it: DECISION_ROUTER_DATABASE_URL={redact_url(database_url)} decision-router stats --by owner",
        markup=False, highlight=False, soft_wrap=True,
    )
    return DemoResult(rows=rows, by=GroupBy.RULE)
