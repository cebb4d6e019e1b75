"""`decision-router bench`: the performance benchmark of issue 8 (benchmarks/run.py).

The benchmark lives in the repository's `benchmarks/` package, next to `decision_router/`,
not in the installed package: run it from a checkout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from decision_router.cli_common import app, fail


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(
    ctx: typer.Context,
    args: Annotated[list[str] | None, typer.Argument(help="options of python -m benchmarks.run (see --help)")] = None,
) -> None:
    """Benchmark reading, routing, latency, memory and scale-out on a real Redis (see README "Performance")."""
    # A checkout installed in development mode has benchmarks/ next to decision_router/.
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "benchmarks" / "run.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from benchmarks.run import main
    except ImportError:
        fail("the benchmark is in the repository's benchmarks/ directory: run this from a checkout", code=2)
    raise typer.Exit(main([*(args or []), *ctx.args]))
