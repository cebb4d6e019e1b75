"""`decision-router stats drift`: the current drift and data-quality figures per model.

A subcommand of the `stats` group (cli_stats.stats_app); registered when this module is
imported; cli.py imports it. The figures come from monitor.assess_models, the same code the service's
periodic check runs, read now against the store.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from decision_router.cli_common import existing_store_or_exit, fail, fail_store, out, settings_or_exit
from decision_router.cli_stats import rules_or_none, stats_app, unknown_model, unseen_model

FORMATS = ("table", "json")


def _number(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric.endswith("_rate"):
        return f"{value:.2%}"
    return f"{value:.4f}"


def _flag(flagged: bool | None) -> Text:
    if flagged is None:
        return Text("not enough data", style="dim")
    return Text("DRIFT", style="bold red") if flagged else Text("ok", style="green")


def print_drift(rows: list[Any], fmt: str, model: str | None = None) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps([row.as_dict() for row in rows], indent=2, ensure_ascii=False) + "\n")
        return
    if not rows:
        # Only the sentence: an empty table's frame above it says nothing.
        # --model names one model: "any model" would read as if the filter had been ignored.
        where = "any model's recent window" if model is None else f"{model}'s recent window"
        out.print(f"no predictions or rejections in {where}", markup=False, highlight=False)
        return
    table = Table(title="drift and data quality by model version (recent window vs reference)", title_justify="left")
    numbers = ("value", "threshold", "n reference", "n recent")
    for header in ("model", "version", "metric", *numbers, "flag", "note"):
        table.add_column(header, justify="right" if header in numbers else "left", overflow="fold",
                         no_wrap=header in ("model", "version", "metric"))
    for row in rows:
        table.add_row(
            Text(row.model), Text(row.model_version), Text(row.metric), _number(row.metric, row.value),
            _number(row.metric, row.threshold), str(row.n_reference), str(row.n_recent), _flag(row.flagged),
            Text(row.note),
        )
    out.print(table)
    out.print(
        "value: PSI for score and feature:<name>, the recent rate for *_rate; threshold: the PSI above which "
        "(or the rate from which) a figure is flagged, sample-size aware; not enough data: a window has fewer "
        "values than drift.min_samples, or no reference yet. version *: the whole model. "
        "--format json has every figure's full detail.",
        style="dim", markup=False, highlight=False, soft_wrap=True,
    )


@stats_app.command("drift")
def drift(
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Drift of scores and features (numbers, or text by category), rejection and missing-context rate jumps, per model version, now."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError
    from sqlmodel import Session

    from decision_router.monitor import assess_models
    from decision_router.pipeline import utcnow
    from decision_router.store import make_engine

    if fmt not in FORMATS:
        fail(f"--format must be table or json, not {fmt!r}", code=2)
    settings = settings_or_exit()
    existing_store_or_exit(settings.database_url)
    # Loaded once: their drift settings, and the models they name for the check of an empty result.
    ruleset = rules_or_none(settings.rules_dir, skipped="every model is checked with the default drift settings")
    engine = make_engine(settings.database_url)
    unknown = None
    try:
        if not inspect(engine).has_table("predictions"):
            rows = []  # a bare store
            unknown = unseen_model(model, [], ruleset, settings.rules_dir) if model is not None else None
        else:
            only = None if model is None else {model}
            with Session(engine) as session:
                models = ruleset.models if ruleset is not None else {}
                rows = assess_models(session, now=utcnow(), ruleset_models=models, only=only)
                unknown = None if rows else unknown_model(session, model, lambda: ruleset, settings.rules_dir)
    except SQLAlchemyError as exc:
        fail_store(settings.database_url, exc, doing="read")
    finally:
        engine.dispose()
    if unknown is not None:
        fail(unknown, code=2)
    print_drift(rows, fmt, model)
