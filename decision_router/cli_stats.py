"""`decision-router stats`, `stats quality`, `stats model`: options and formatting.

The numbers come from stats.py (pure reads of the store) and uplift.py (the maths). `stats`
is a typer group that still prints the main table when called without a subcommand; other
modules add subcommands to `stats_app` (e.g. `@stats_app.command("drift")`). Registered
on the CLI's `app` (cli_common.py) when imported; cli.py imports it.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from decision_router.cli_common import (
    App,
    _window,
    app,
    err,
    existing_store_or_exit,
    fail,
    fail_store,
    no_gc_until_done,
    out,
    settings_or_exit,
)
from decision_router.uplift import DEFAULT_BAND_EDGES, MIN_N

if TYPE_CHECKING:  # stats.py pulls in SQLAlchemy: imported where a command needs it, so other commands start fast
    from decision_router.rules import RuleSet
    from decision_router.settings import Settings
    from decision_router.stats import BandRow, GroupBy, QualityReport, StatsRow

FORMATS = ("table", "json", "csv")
T = TypeVar("T")

stats_app = App(
    help="Who acts, how fast, and whether it works: outcomes, uplift, data quality, model precision.",
    invoke_without_command=True,
    order=("quality", "model", "drift"),  # drift in cli_drift.py
)
app.add_typer(stats_app, name="stats")


# Shared option types -------------------------------------------------------------------

FormatOption = Annotated[str, typer.Option("--format", help="table, json or csv.")]
SinceOption = Annotated[str | None, typer.Option(help="Only since: a duration ago (7d, 24h) or an ISO date.")]
UntilOption = Annotated[str | None, typer.Option(help="Only before: a duration ago or an ISO date.")]
ModelOption = Annotated[str | None, typer.Option(help="Only this model.")]


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        fail(f"--format must be table, json or csv, not {fmt!r}", code=2)
    return fmt


@contextmanager
def _store(settings: Settings) -> Iterator[Any]:
    """A read session on the store (tables are created if missing, as the service does).

    One catalog query tells whether the store is up to date; only a new or older store goes through
    create_schema (its checks are a dozen round trips, and it may build the stats indexes, once).
    """
    from sqlalchemy.exc import SQLAlchemyError
    from sqlmodel import Session

    from decision_router.store import create_schema, make_engine, schema_is_current

    existing_store_or_exit(settings.database_url)
    engine = make_engine(settings.database_url, mapped_reads=True)
    try:
        if not schema_is_current(engine):
            create_schema(engine)
        with Session(engine) as session:
            yield session
    except SQLAlchemyError as exc:
        fail_store(settings.database_url, exc, doing="read")
    finally:
        engine.dispose()


def _read(settings: Settings, compute: Callable[[Any], T]) -> T:
    with _store(settings) as session:
        return compute(session)


def rules_or_none(rules_dir: Path, *, skipped: str | None = None) -> RuleSet | None:
    """The rules in `rules_dir`; None if they do not load, with a warning saying what is `skipped` then
    (none when not given: a typo check without the rules just does not say "did you mean")."""
    from decision_router.rules import RulesInvalid, load_rules

    try:
        return load_rules(rules_dir)
    except RulesInvalid as exc:
        if skipped is not None:
            first = exc.problems[0] if exc.problems else "invalid"
            err.print(
                f"warning: cannot load the rules in {rules_dir} ({first}); {skipped} "
                "(set DECISION_ROUTER_RULES_DIR to the rules the service runs)",
                style="yellow", markup=False, highlight=False, soft_wrap=True,
            )
        return None


def rules_for_stats(rules_dir: Path) -> RuleSet | None:
    """The rules `stats` reads its holdouts from (and checks --rule, --owner, --model against)."""
    return rules_or_none(rules_dir, skipped="the sample ratio check is skipped")


class RulesLoading(Mapping[str, float]):
    """rules_for_stats(rules_dir), once per command, in a thread when `in_thread`: the rules then load
    while PostgreSQL counts (psycopg waits for the whole result with the GIL released). Not on SQLite:
    its driver takes the GIL back after each row and each statement of the rank walks, so a thread
    loading meanwhile slows the query by more than it saves (measured: benchmarks/bench_stats.py).
    As a mapping, rule name -> configured holdout (rules that do not load read as {}): compute_stats
    reads it after its counts query. `ruleset()`: the rules themselves, for the checks of an empty
    result. Either waits for the load."""

    def __init__(self, rules_dir: Path, *, in_thread: bool) -> None:
        import threading

        self._outcome: tuple[RuleSet | None, BaseException | None] = (None, None)
        self._holdouts: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        if in_thread:
            self._thread = threading.Thread(target=self._load, args=(rules_dir,), name="load-rules", daemon=True)
            self._thread.start()
        else:
            self._load(rules_dir)

    def _load(self, rules_dir: Path) -> None:
        try:
            ruleset = rules_for_stats(rules_dir)
        except BaseException as exc:  # raised where the rules are read, as if loaded there
            self._outcome = (None, exc)
            return
        self._outcome = (ruleset, None)
        self._holdouts = {rule.name: rule.holdout for rule in ruleset.rules} if ruleset is not None else {}

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def ruleset(self) -> RuleSet | None:
        self.join()
        ruleset, error = self._outcome
        if error is not None:
            raise error
        return ruleset

    def wait(self) -> dict[str, float]:
        self.ruleset()
        return self._holdouts

    def __getitem__(self, rule: str) -> float:
        return self.wait()[rule]

    def __iter__(self) -> Iterator[str]:
        return iter(self.wait())

    def __len__(self) -> int:
        return len(self.wait())


# Output helpers ------------------------------------------------------------------------


def _json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return ";".join(f"{k}={v}" for k, v in value.items())
    return value


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    sys.stdout.write(buffer.getvalue())


def say(text: str, *, style: str | None = None) -> None:
    """One line of plain text: values from the store are never read as markup."""
    out.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _format_value(column: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if column.endswith("_s"):
        hours = value / 3600
        return f"{hours:.1f}h" if hours >= 1 else f"{value / 60:.0f}m"
    if column.endswith(("_rate", "_fraction")):
        return f"{value:.0%}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1_000 else f"{value:,.0f}"
    return str(value)


def _percent(value: float | None) -> str:
    """A rate as a percentage; one decimal below 10%, so 6 in 3000 is 0.2%, not 0%."""
    if value is None:
        return "n/a"
    return f"{value:.1%}" if 0 < value < 0.1 else f"{value:.0%}"


def _points(value: float) -> str:
    """A difference of rates in percentage points: 0.1 -> "+10.0"."""
    return f"{value * 100:+.1f}"


def _uplift_cell(row: StatsRow) -> str:
    if row.uplift is None or row.uplift_ci_low is None or row.uplift_ci_high is None:
        return "not enough data" if row.has_control else "no control group"
    return f"{_points(row.uplift)} [{_points(row.uplift_ci_low)}, {_points(row.uplift_ci_high)}]"


def _seq_cell(row: StatsRow) -> str:
    if row.uplift_seq_low is None or row.uplift_seq_high is None:
        return "n/a"
    return f"[{_points(row.uplift_seq_low)}, {_points(row.uplift_seq_high)}]"


def _srm_cell(row: StatsRow) -> str:
    if row.srm_expected_fraction is None:
        return "-"
    if row.srm_mismatch is None:
        return "n/a"
    return "SRM!" if row.srm_mismatch else "ok"


# The terminal table shows a subset that fits 160 columns; JSON and CSV carry every column.
# (column, header, cell) per table column; the group key comes first.
TABLE_COLUMNS: list[tuple[str, str, Callable[[StatsRow], str]]] = [
    ("routed", "routed", lambda r: str(r.routed)),
    ("held_out", "held\nout", lambda r: str(r.held_out)),
    ("acknowledged", "acked", lambda r: str(r.acknowledged)),
    ("intervention_rate", "act\nrate", lambda r: _percent(r.intervention_rate)),
    ("median_time_to_act_s", "median\nto act", lambda r: _format_value("median_time_to_act_s", r.median_time_to_act_s)),
    ("success_rate", "success", lambda r: _percent(r.success_rate)),
    ("control_success_rate", "control\nsuccess", lambda r: _percent(r.control_success_rate)),
    ("uplift", "uplift, pts\n[95% CI]", _uplift_cell),
    ("uplift_seq", "always-valid\n95% CI", _seq_cell),
    ("srm_mismatch", "SRM", _srm_cell),
    ("escalations", "escal.", lambda r: str(r.escalations)),
    ("sla_breaches", "SLA\nbreaches", lambda r: str(r.sla_breaches)),
]

LEGEND = (
    "success: routed alerts with an outcome that succeeded; control success: the same for held-out (control) records.",
    "uplift: treated minus control success rate, in percentage points, with its fixed 95% interval in brackets;",
    "  if you check these numbers regularly, read the always-valid interval instead (README, Stats).",
    f"not enough data: under {MIN_N} treated or control records with an outcome; "
    "no control group: no holdout and no held-out records;",
    "n/a: nothing to compute it from; SRM -: no single rule's holdout applies to this row.",
)


def _srm_warning(row: StatsRow) -> str:
    assert row.srm_observed_fraction is not None and row.srm_expected_fraction is not None
    return (
        f"SRM! {row.key}: control share {row.srm_observed_fraction:.1%} of {row.routed + row.held_out} decisions, "
        f"configured holdout {row.srm_expected_fraction:.0%} (p = {row.srm_p_value:.2g}): assignment or tracking is "
        "broken, so its uplift cannot be trusted."
    )


def nothing_shown(what: str, filters: Mapping[str, str | None] | None = None) -> str:
    """The line under an empty table. With filters given (option -> value), they name the reason: the window
    may hold alerts, none of them matching (a rule and an owner that share none); "yet" would blame the window."""
    given = " ".join(f"{option} {shlex.quote(value)}" for option, value in (filters or {}).items() if value is not None)
    return f"no {what} match {given} in this window" if given else f"no {what} in this window yet"


def print_stats(
    rows: list[StatsRow], by: GroupBy | str, fmt: str, filters: Mapping[str, str | None] | None = None
) -> None:
    """The main stats in `fmt` (table, json or csv); `filters` (option -> value) name an empty result."""
    from decision_router.stats import GroupBy, stats_columns

    by = GroupBy(by)
    dicts = [row.as_dict(by) for row in rows]
    if fmt == "json":
        _json(dicts)
        return
    if fmt == "csv":
        _csv(dicts, stats_columns(by))
        return
    title = "intervention outcomes by " + by.value.replace("_", " ")
    table = Table(title=title, title_justify="left")
    table.add_column(by.value.replace("_", " "), justify="left", no_wrap=True)
    for column, header, _cell in TABLE_COLUMNS:
        table.add_column(header, justify="right", no_wrap=column.startswith("uplift"))
    for row in rows:
        table.add_row(Text(row.key), *(Text(cell(row)) for _column, _header, cell in TABLE_COLUMNS))
    out.print(table)
    if not rows:
        say(nothing_shown("alerts", filters))
        return
    for line in LEGEND:
        say(line, style="dim")
    for row in rows:
        if row.srm_mismatch:
            say(_srm_warning(row), style="bold yellow")


def _warn_srm(rows: list[StatsRow]) -> None:
    for row in rows:
        if row.srm_mismatch:
            err.print(f"warning: {_srm_warning(row)}", style="yellow", markup=False, highlight=False, soft_wrap=True)


# stats ---------------------------------------------------------------------------------


@stats_app.callback(invoke_without_command=True)
def stats(
    ctx: typer.Context,
    by: Annotated[str, typer.Option(help="Group by rule, owner, model, model_version, priority or week.")] = "rule",
    fmt: FormatOption = "table",
    since: Annotated[str | None, typer.Option(help="Only alerts created since: 7d, 24h or an ISO date.")] = None,
    until: Annotated[str | None, typer.Option(help="Only alerts created before: 1d or an ISO date.")] = None,
    rule: Annotated[str | None, typer.Option(help="Only this rule.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only alerts owned by this owner id.")] = None,
    model: ModelOption = None,
) -> None:
    """Routed, acknowledged, intervened, success treated vs control, uplift, SRM; per rule, owner, model, ..."""
    no_gc_until_done(ctx)  # `stats` and its subcommands only read and print
    if ctx.invoked_subcommand is not None:
        return
    from decision_router.stats import GroupBy, compute_stats

    try:
        group = GroupBy(by)
    except ValueError:
        fail(f"--by must be one of {', '.join(g.value for g in GroupBy)}, not {by!r}", code=2)
    _check_format(fmt)
    start, end = _window(since, until)
    settings = settings_or_exit()

    def read(session: Any) -> tuple[list[StatsRow], str | None]:
        # Started now, not earlier: SQLAlchemy's imports are done (the thread imports the rules'
        # modules, and holds the import lock meanwhile), and the database is about to count.
        rules = RulesLoading(settings.rules_dir, in_thread=session.get_bind().dialect.name == "postgresql")
        try:
            rows = compute_stats(
                session, by=group, since=start, until=end, rule=rule, owner=owner, model=model, holdouts=rules,
            )
        finally:
            rules.join()  # also when the store fails: a warning about the rules comes before the error
        if rows:
            return rows, None
        # The checks of an empty result read the rules loaded for the holdouts: not once more each.
        unknown = _unknown_filter(session, rules.ruleset, settings.rules_dir, rule=rule, owner=owner)
        return rows, unknown or unknown_model(session, model, rules.ruleset, settings.rules_dir)

    rows, unknown = _read(settings, read)
    if unknown is not None:
        fail(unknown, code=2)
    if fmt != "table":
        _warn_srm(rows)
    print_stats(rows, group, fmt, {"--rule": rule, "--owner": owner, "--model": model})


def _unknown_filter(
    session: Any, rules: Callable[[], RuleSet | None], rules_dir: Path, *, rule: str | None, owner: str | None
) -> str | None:
    """Why an empty result is a typo (--rule, --owner): stats_filters.unknown_rule_or_owner, as the CLI says it.
    None when the rules do not load (rules_for_stats has warned)."""
    from decision_router.stats_filters import unknown_rule_or_owner

    unknown = unknown_rule_or_owner(session, rules, rule=rule, owner=owner, rules_dir=rules_dir, prefix="--")
    return unknown.message if unknown is not None else None


def unknown_model(
    session: Any, model: str | None, rules: Callable[[], RuleSet | None], rules_dir: Path
) -> str | None:
    """Why an empty result is a typo (--model): stats_filters.unknown_model, as the CLI says it. `rules`: those
    of `rules_dir`, loaded when first called (not at all for a model the store knows)."""
    from decision_router import stats_filters

    unknown = stats_filters.unknown_model(session, model, rules, rules_dir=rules_dir, prefix="--")
    return unknown.message if unknown is not None else None


def unseen_model(model: str, stored: list[str], ruleset: RuleSet | None, rules_dir: Path) -> str | None:
    """The error for a --model the store has never seen: stats_filters.unseen_model, as the CLI says it."""
    from decision_router import stats_filters

    unknown = stats_filters.unseen_model(model, stored, ruleset, rules_dir=rules_dir, prefix="--")
    return unknown.message if unknown is not None else None


# stats quality -------------------------------------------------------------------------


QUALITY_CSV_COLUMNS = [
    "model", "accepted", "rejected", "rejection_rate", "decisions", "fallback_owner", "fallback_owner_rate",
    "missing_context", "missing_context_rate", "missing_fields", "rejections",
]


def _top(pairs: tuple[tuple[str, int], ...], limit: int = 3) -> str:
    shown = ", ".join(f"{name} {count}" for name, count in pairs[:limit])
    return shown + (f", +{len(pairs) - limit} more" if len(pairs) > limit else "") if shown else "-"


def print_quality(report: QualityReport, fmt: str, model: str | None = None) -> None:
    from decision_router.stats import UNKNOWN_MODEL

    if fmt == "json":
        _json(report.as_dict())
        return
    if fmt == "csv":
        _csv([row.as_dict() for row in report.models], QUALITY_CSV_COLUMNS)
        return
    table = Table(title="data quality by model", title_justify="left")
    for header in ("model", "accepted", "rejected", "rejected %", "decisions", "fallback owner", "missing context",
                   "most often missing"):
        table.add_column(header, justify="left" if header in ("model", "most often missing") else "right")
    for row in report.models:
        table.add_row(*(Text(cell) for cell in (
            row.model, str(row.accepted), str(row.rejected), _percent(row.rejection_rate),
            str(row.decisions), f"{row.fallback_owner} ({_percent(row.fallback_owner_rate)})",
            f"{row.missing_context} ({_percent(row.missing_context_rate)})", _top(row.missing_fields),
        )))
    out.print(table)
    if not report.models:
        say(nothing_shown("predictions", {"--model": model}))
    if report.rejections:
        rejections = Table(title="rejected predictions by model and reason", title_justify="left")
        for header in ("model", "reason", "rejected"):
            rejections.add_column(header, justify="right" if header == "rejected" else "left")
        for r in report.rejections:
            rejections.add_row(Text(r.model), Text(r.reason), str(r.count))
        out.print(rejections)
    outcomes = ", ".join(f"{reason} {n}" for reason, n in report.outcome_rejections) or "none"
    say(f"outcome events rejected (all models): {outcomes}")
    say("rejected %: of predictions received (accepted + rejected); fallback owner, missing context: share of routing "
        "decisions;", style="dim")
    say(f"{UNKNOWN_MODEL}: rejected input without a readable model.", style="dim")


@stats_app.command("quality")
def quality(
    fmt: FormatOption = "table",
    since: SinceOption = None,
    until: UntilOption = None,
    model: ModelOption = None,
) -> None:
    """Accepted and rejected predictions per model and reason, fallback owners, missing context."""
    from decision_router.stats import compute_quality

    _check_format(fmt)
    start, end = _window(since, until)
    settings = settings_or_exit()

    def read(session: Any) -> tuple[QualityReport, str | None]:
        report = compute_quality(session, since=start, until=end, model=model)
        rules = partial(rules_or_none, settings.rules_dir)
        return report, None if report.models else unknown_model(session, model, rules, settings.rules_dir)

    report, unknown = _read(settings, read)
    if unknown is not None:
        fail(unknown, code=2)
    print_quality(report, fmt, model)


# stats model ---------------------------------------------------------------------------


def _band(row: BandRow) -> str:
    return f"{row.band_low:g}-{row.band_high:g}"


def print_model_precision(rows: list[BandRow], fmt: str, model: str | None = None) -> None:
    from decision_router.stats import BandRow

    dicts = [row.as_dict() for row in rows]
    if fmt == "json":
        _json(dicts)
        return
    if fmt == "csv":
        _csv(dicts, [f.name for f in fields(BandRow)])
        return
    table = Table(title="model precision by score band, from the control group", title_justify="left")
    for header in ("model", "version", "score band", "held out", "with outcome", "bad outcome", "precision", "95% CI"):
        table.add_column(header, justify="left" if header in ("model", "version") else "right")
    for row in rows:
        ci = "n/a" if row.ci_low is None or row.ci_high is None else f"{row.ci_low:.0%}-{row.ci_high:.0%}"
        table.add_row(
            Text(row.model), Text(row.model_version), _band(row), str(row.held_out), str(row.n), str(row.positives),
            _percent(row.precision), ci,
        )
    out.print(table)
    if not rows:
        say(f"{nothing_shown('control predictions', {'--model': model})}: precision needs a rule with a holdout "
            "(README, Control groups)")
        return
    say("precision: of the control predictions in the band (nobody alerted, nobody intervened) that have an outcome,",
        style="dim")
    say("the share whose outcome was the bad one the model predicts (result: failure); n/a: none with an outcome yet.",
        style="dim")


@stats_app.command("model")
def model_precision(
    model: ModelOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    bands: Annotated[
        str | None, typer.Option(help="Band edges, comma-separated (default deciles: 0,0.1,...,1).")
    ] = None,
    fmt: FormatOption = "table",
) -> None:
    """Model precision by score band per model version, from the untouched control group."""
    from decision_router.stats import compute_model_precision, parse_band_edges

    _check_format(fmt)
    edges = DEFAULT_BAND_EDGES
    if bands is not None:
        try:
            edges = parse_band_edges(bands)
        except ValueError as exc:
            fail(f"--bands: {exc}", code=2)
    start, end = _window(since, until)
    settings = settings_or_exit()

    def read(session: Any) -> tuple[list[BandRow], str | None]:
        rows = compute_model_precision(session, model=model, since=start, until=end, edges=edges)
        rules = partial(rules_or_none, settings.rules_dir)
        return rows, None if rows else unknown_model(session, model, rules, settings.rules_dir)

    rows, unknown = _read(settings, read)
    if unknown is not None:
        fail(unknown, code=2)
    print_model_precision(rows, fmt, model)
