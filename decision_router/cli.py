"""`decision-router`: parse arguments, call the modules that do the work, format output.

This module has `main`, the commands `serve`, `demo`, `publish`, `outcome`, `rules check` and `health`, and
imports the other command modules (cli_*.py) so that they register theirs. What they share (the `app`,
the consoles, `fail`, the settings and store helpers) is in cli_common.py, which imports none of them.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated, Any

import typer

from decision_router.cli_common import (
    MAX_SIMULATED_ENTITIES,
    OUTCOME_OPTIONS,
    _connect,
    app,
    err,
    existing_store_or_exit,
    fail,
    fail_rules,
    fail_store,
    fail_with_problems,
    out,
    parse_entity,
    rules_app,
    run_interruptibly,
    run_on_redis,
    send_outcome,
    settings_or_exit,
    smtp_or_exit,
)
from decision_router.echo import counted
from decision_router.keys import Keys

# serve / demo --------------------------------------------------------------------------


@app.command()
def serve(
    api: Annotated[bool, typer.Option("--api/--no-api", help="Also serve the HTTP API and dashboard.")] = True,
    api_port: Annotated[
        int | None, typer.Option(help="HTTP API port, 0-65535 (default DECISION_ROUTER_API_PORT or 8080).")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=256, help="Worker processes in one consumer group (needs a real Redis).")
    ] = 1,
) -> None:
    """Run the router: consume predictions and outcomes, route, deliver, record; serve the HTTP API."""
    import signal

    # SIGHUP ("re-read the rules") ends a process that has no handler for it yet: held back until the
    # service (or the workers' supervisor) has one, then delivered to it (service.serve, workers.run_workers).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    import asyncio

    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.api.server import ApiStartError
    from decision_router.embedded import EmbeddedRedisError
    from decision_router.redis_client import REDIS_ERRORS, cluster_hint
    from decision_router.rules import RulesInvalid
    from decision_router.service import serve as run
    from decision_router.settings import redact_text, redact_url

    settings = settings_or_exit(options={"--api-port": ("api_port", api_port)})
    smtp_or_exit(settings)
    try:
        if workers > 1:
            from decision_router.workers import WorkersError, run_workers

            try:
                raise typer.Exit(run_workers(settings, workers, api=api))
            except WorkersError as exc:
                fail(str(exc), code=2)
        asyncio.run(run(settings, api=api))
    except RulesInvalid as exc:
        fail_rules(settings, exc, starting=True)
    except ApiStartError as exc:
        hint = "; set --api-port or DECISION_ROUTER_API_PORT to a free port, or run without it: --no-api"
        fail(f"{exc}{hint if exc.cannot_bind else ''}")
    except EmbeddedRedisError as exc:
        fail(str(exc))
    except REDIS_ERRORS as exc:
        # Only at start (creating the consumer groups), e.g. a wrong password or Redis down: once
        # running, the read loop waits out Redis outages.
        from redis.exceptions import OutOfMemoryError

        if isinstance(exc, OutOfMemoryError):  # reachable, but it refuses the consumer groups' writes
            fail(f"Redis at {redact_url(settings.effective_redis_url)} is full (maxmemory, no eviction): "
                 f"{redact_text(str(exc))} Free memory (trim streams) or raise maxmemory, then start again.")
        fail(f"cannot reach Redis at {redact_url(settings.effective_redis_url)}: {redact_text(str(exc))}"
             f"{cluster_hint(exc)}")
    except SQLAlchemyError as exc:
        # Only at start (creating the schema): once running, the read loop waits out store outages.
        fail_store(settings.database_url, exc)




@app.command()
def demo(
    predictions: Annotated[
        int, typer.Option(min=1, max=MAX_SIMULATED_ENTITIES, help="How many synthetic churn predictions to publish.")
    ] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed, for a repeatable run.")] = 7,
    database: Annotated[
        str | None, typer.Option(help="Database URL (default: a fresh SQLite file, decision_router_demo.db).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the service's per-batch log lines.")] = False,
) -> None:
    """Run the whole loop in one process, no server needed, and print the stats."""
    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.demo import DEMO_DATABASE, DemoSetupError, run_demo
    from decision_router.rules import RulesInvalid

    settings = settings_or_exit(
        log_level=None if verbose else "warning", options={"--database": ("database_url", database)}
    )
    if database is not None:
        database = settings.database_url  # checked and normalised like DECISION_ROUTER_DATABASE_URL
    try:
        result = run_interruptibly(
            run_demo(settings, predictions=predictions, seed=seed, database_url=database, console=out)
        )
    except DemoSetupError as exc:
        fail(f"{exc}: run it from a writable directory")
    except RulesInvalid as exc:
        fail(f"the rules in {settings.rules_dir} are invalid:\n{exc}")
    except SQLAlchemyError as exc:
        fail_store(database or f"sqlite:///{DEMO_DATABASE}", exc)
    from decision_router.cli_stats import print_stats

    print_stats(result.rows, result.by, "table")
    # Last, where the eye lands when the demo ends: the next thing to run (it was above the stats table).
    out.print(result.explore, markup=False, highlight=False, soft_wrap=True)


# publish / outcome ---------------------------------------------------------------------


@app.command()
def publish(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, metavar="FILE", help="JSON lines or CSV of predictions.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="auto (by extension), jsonl or csv.")] = "auto",
    batch: Annotated[int, typer.Option(min=1, help="Entries per pipelined write.")] = 500,
) -> None:
    """Publish predictions from a file onto the predictions stream; bad lines are reported and skipped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from decision_router.contracts import Prediction
    from decision_router.publisher import (
        BadLine,
        FileFormatError,
        FileSummary,
        chunks,
        describe,
        publish_predictions,
        read_entries,
        validate_entry,
    )

    if fmt not in ("auto", "jsonl", "csv"):
        fail(f"--format must be auto, jsonl or csv, not {fmt!r}", code=2)
    settings = settings_or_exit()
    stream = Keys(settings.stream_prefix).predictions
    summary = FileSummary()
    limits = settings.payload_limits
    try:
        total = sum(1 for _ in read_entries(file, fmt, limits))
    except FileFormatError as exc:
        fail(str(exc), code=2)

    async def run() -> None:
        redis = await _connect(settings)
        try:
            with Progress(
                TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=err, transient=True, disable=not err.is_terminal,
            ) as progress:
                task = progress.add_task("publish", total=total)
                for group in chunks(read_entries(file, fmt, limits), batch):
                    good: list[Prediction] = []
                    for number, entry in group:
                        checked = validate_entry(entry, limits)
                        if isinstance(checked, Prediction):
                            good.append(checked)
                        else:
                            summary.bad.append(BadLine(number, describe(checked)))
                            err.print(f"{file}:{number}: skipped: {describe(checked)}", highlight=False)
                    await publish_predictions(redis, stream, good)
                    summary.published += len(good)
                    progress.advance(task, len(group))
        finally:
            await redis.aclose()

    run_on_redis(settings, run())
    out.print(f"published {counted(summary.published, 'prediction')} to {stream}; "
              f"skipped {counted(len(summary.bad), 'bad line')}")
    if summary.bad and not summary.published:
        raise typer.Exit(1)


@app.command()
def outcome(
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="acknowledged | intervened | outcome | reassigned")],
    actor: Annotated[str, typer.Option(help="Who did it (owner id, system name).")],
    alert: Annotated[str | None, typer.Option(help="Address by alert_id.")] = None,
    prediction: Annotated[str | None, typer.Option(help="Address by prediction_id.")] = None,
    entity: Annotated[str | None, typer.Option(help="Address by entity, as TYPE:ID (e.g. account:acct-17).")] = None,
    action: Annotated[str | None, typer.Option(help="What was done (e.g. exec-call, discount-offer).")] = None,
    result: Annotated[str | None, typer.Option(help="For TYPE outcome: success | failure.")] = None,
    value: Annotated[float | None, typer.Option(help="A measured value (e.g. renewed ARR).")] = None,
    owner: Annotated[str | None, typer.Option(help="For TYPE reassigned: the new owner's id.")] = None,
    note: Annotated[str | None, typer.Option(help="Free text kept in the audit trail.")] = None,
    at: Annotated[
        str | None,
        typer.Option(help="When it happened, ISO-8601 (no offset: UTC), e.g. 2026-11-20T14:05Z; default: when the "
                          "router processes it."),
    ] = None,
) -> None:
    """Record an outcome event (it goes onto the outcomes stream, like any producer's)."""
    document: dict[str, Any] = {
        "type": type_, "actor": actor, "alert_id": alert, "prediction_id": prediction,
        "action": action, "result": result, "value": value, "owner": owner, "note": note, "at": at,
    }
    if entity is not None:
        entity_type, entity_id = parse_entity(entity)
        document.update(entity_type=entity_type, entity_id=entity_id)
    from decision_router.cli_governance import alert_check

    settings = settings_or_exit()
    # As `reassign`: an alert id the store lacks, or an action after the alert's outcome, is an error here, not
    # "recorded" for the router to dead-letter.
    send_outcome(document, settings, options=OUTCOME_OPTIONS, before_publishing=alert_check(settings, document))


# rules / health ------------------------------------------------------------------------


@rules_app.command("check")
def rules_check(
    directory: Annotated[
        Path | None,
        typer.Argument(metavar="DIR", help="Rules directory (default: DECISION_ROUTER_RULES_DIR or ./rules)."),
    ] = None,
) -> None:
    """Validate routing.yaml and owners.yaml; list every problem; exit 0 only when valid."""
    from decision_router.rules import check_rules, load_rules

    given = directory is not None
    directory = directory or settings_or_exit().rules_dir
    problems = check_rules(directory)
    if problems:
        fail_with_problems(problems, directory, given=given)
    ruleset = load_rules(directory)
    out.print(
        f"{directory}: ok — {counted(len(ruleset.rules), 'rule')}, {counted(len(ruleset.owners), 'owner')}, "
        f"version {ruleset.version}",
        highlight=False,
    )


@app.command()
def health() -> None:
    """Exit 0 when Redis and the database answer (used by the compose health check)."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.store import make_engine

    settings = settings_or_exit()

    async def ping() -> None:
        redis = await _connect(settings)
        await redis.aclose()

    asyncio.run(ping())
    # A missing SQLite file is a store that does not answer: connecting would create an empty one,
    # and report a router whose store is elsewhere (serve's working directory) as healthy.
    existing_store_or_exit(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except SQLAlchemyError as exc:
        # Why, not only the class name: "OperationalError" said neither a missing database nor a closed port.
        engine.dispose()
        fail_store(settings.database_url, exc)
    engine.dispose()
    out.print("ok")


# The commands defined in other modules register themselves on `app` (cli_common.py) when imported: here, after
# this module's own. `--help` lists them in the order given to `app` in cli_common.py, not in this one.
# isort: off
# audit, reassign, rules test, rules replay: defined in cli_governance.py on `app` and `rules_app`.
from decision_router import cli_delivery, cli_governance  # noqa: E402, F401

# stats, stats quality, stats model: the `stats` group (cli_stats.stats_app), added to `app` there.
from decision_router import cli_stats  # noqa: E402, F401

# stats drift: defined in cli_drift.py on the `stats` group.
from decision_router import cli_drift  # noqa: E402, F401

# simulate: defined in cli_simulate.py on `app`.
from decision_router import cli_simulate  # noqa: E402, F401

# api, tokens, asyncapi: defined in cli_api.py on `app`.
from decision_router import cli_api  # noqa: E402, F401

# bench: the benchmark of issue 8 (benchmarks/run.py), defined in cli_bench.py on `app`.
from decision_router import cli_bench  # noqa: E402, F401
# isort: on


def main() -> None:
    try:
        app()
    finally:
        # Exit promptly: the interpreter's last garbage collections walk every object the
        # imports made (FastAPI, SQLAlchemy, pydantic models), about half a second after
        # `serve` has stopped cleanly. Frozen objects are skipped; nothing is left unflushed.
        gc.freeze()
