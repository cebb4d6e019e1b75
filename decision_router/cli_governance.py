"""Operator and rules-author commands: `audit`, `reassign`, `rules test`, `rules replay`.

Registered on the CLI's `app` and `rules_app` (cli_common.py) when imported; cli.py imports it.
The work is done in audit.py, explain.py and replay.py; this module parses options and formats.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer
from rich.table import Table
from rich.text import Text

from decision_router.cli_common import (
    REASSIGN_OPTIONS,
    _window,
    app,
    err,
    existing_store_or_exit,
    fail,
    fail_store,
    fail_with_problems,
    out,
    parse_entity,
    rules_app,
    send_outcome,
    settings_or_exit,
)
from decision_router.echo import counted, did_you_mean

if TYPE_CHECKING:
    from decision_router.settings import Settings

FORMATS = ("table", "json")


def _format(fmt: str) -> str:
    if fmt not in FORMATS:
        fail(f"--format must be table or json, not {fmt!r}", code=2)
    return fmt


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def say(text: str = "", *, style: str | None = None, stderr: bool = False) -> None:
    """One line of plain text: values from the store or a prediction are never read as markup."""
    (err if stderr else out).print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _as_directory(path: Path) -> str:
    """`rules/`: a rules directory as a header names it (`rules rules (version ...)` read as a stammer)."""
    return str(path).rstrip(os.sep) + os.sep


def _json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def read_store(settings: Settings) -> Iterator[Any]:
    """A Session on the store (None when it has no tables yet); it is never committed."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError
    from sqlmodel import Session

    from decision_router.store import make_engine

    existing_store_or_exit(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        if not inspect(engine).has_table("alerts"):
            yield None
        else:
            with Session(engine) as session:
                yield session
                session.rollback()
    except SQLAlchemyError as exc:
        fail_store(settings.database_url, exc, doing="read")
    finally:
        engine.dispose()


def _ruleset_or_exit(directory: Path, *, given: bool = True) -> Any:
    """The rule set in `directory`, or every problem on stderr and exit 1 (as `rules check`); `given`: named
    on the command line, not DECISION_ROUTER_RULES_DIR."""
    from decision_router.rules import RulesInvalid, load_rules

    try:
        return load_rules(directory)
    except RulesInvalid as exc:
        fail_with_problems(exc.problems, directory, given=given)


# audit ---------------------------------------------------------------------------------


def _print_alert(story: Any, *, siblings: bool) -> None:
    alert, prediction = story.alert, story.prediction
    say(f"alert {alert.alert_id}  rule {alert.rule}  rules version {alert.rules_version}  "
        f"entity {alert.entity_type}:{alert.entity_id}", style="bold")
    if prediction is not None:
        say(f"prediction {prediction.prediction_id}: {prediction.model} {prediction.model_version}, "
            f"score {prediction.score:g}, predicted {_when(prediction.predicted_at)}, received {_when(prediction.received_at)}")
    owner = alert.owner if alert.owner == alert.original_owner else f"{alert.owner} (originally {alert.original_owner})"
    say(f"owner {owner} via {alert.owner_source}  priority {alert.priority}  action {alert.effective_action}  "
        f"status {alert.status}" + (f"  outcome {alert.outcome}" if alert.outcome else ""))
    if siblings and story.siblings:
        say("other decisions for this prediction:")
        for s in story.siblings:
            say(f"  {s.alert_id}  {s.rule} -> {s.owner}  {s.priority}  {s.effective_action}")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("when", "event", "actor", "what"):
        table.add_column(column, overflow="fold")
    for event in story.events:
        table.add_row(*(Text(cell) for cell in (_when(event.at), event.type, event.actor, event.summary)))
    out.print(table)


@app.command()
def audit(
    alert_id: Annotated[
        str | None, typer.Argument(metavar="ALERT_ID", help="The alert to tell the story of.")
    ] = None,
    entity: Annotated[str | None, typer.Option(help="Every prediction and decision for TYPE:ID (e.g. account:acct-17).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """The full story of an alert or an entity: received, routed, delivered, acknowledged, escalated, outcome."""
    from decision_router.audit import alert_story, entity_story
    from decision_router.settings import redact_url

    _format(fmt)
    if (alert_id is None) == (entity is None):
        fail("give an ALERT_ID or --entity TYPE:ID (one of the two)", code=2)
    entity_key = parse_entity(entity) if entity is not None else None
    settings = settings_or_exit()
    with read_store(settings) as session:
        if entity_key is None:
            story = alert_story(session, alert_id) if session is not None else None  # type: ignore[arg-type]
            missing = f"no alert {alert_id!r} in the store"
        else:
            story = entity_story(session, *entity_key) if session is not None else None
            missing = f"nothing recorded for entity {entity!r} in the store"
    if story is None:
        fail(f"{missing} at {redact_url(settings.database_url)}")
    if fmt == "json":
        _json(story.as_dict())
    elif entity_key is None:
        _print_alert(story, siblings=True)
    else:
        say(f"entity {entity}: {counted(len(story.predictions), 'prediction')}, "
            f"{counted(len(story.alerts), 'decision')}",
            style="bold")
        for alert_story_ in story.alerts:
            say()
            _print_alert(alert_story_, siblings=False)


# reassign ------------------------------------------------------------------------------


@app.command()
def reassign(
    alert_id: Annotated[str, typer.Argument(metavar="ALERT_ID", help="The alert to hand over.")],
    to: Annotated[str, typer.Option("--to", help="The new owner's id (must be in the owner directory).")],
    by: Annotated[str, typer.Option("--by", help="Who reassigns it (kept as the event's actor).")],
    reason: Annotated[str | None, typer.Option(help="Why; kept in the audit trail as the note.")] = None,
) -> None:
    """Hand an alert to another owner: the same event as `outcome reassigned --alert ID --owner ...`."""
    from decision_router.router import present_owner
    from decision_router.rules import RulesInvalid, load_rules
    from decision_router.tracker import reassign_note

    settings = settings_or_exit()
    present = to
    try:
        owners = load_rules(settings.rules_dir).owners
    except RulesInvalid:
        say(f"warning: the rules in {settings.rules_dir} do not load, so '{to}' is not checked here; "
            "the router dead-letters a reassignment to an unknown owner (unknown_owner)", stderr=True)
    else:
        if to not in owners:
            fail(f"owner '{to}' is not in the owner directory ({settings.rules_dir}){did_you_mean(to, owners)}", code=2)
        # The router hands it on as it does a routed alert: say so, or the user looks for it in the wrong inbox.
        if (present := present_owner(to, owners, datetime.now(UTC))) != to:
            say(f"note: '{to}' is away; the router gives the alert to their delegate '{present}'", stderr=True)

    def check_alert() -> None:
        """Once the event passed the router's gate (an empty or oversized id is refused there, as such)."""
        held = _held_or_exit(settings, alert_id)
        # Published all the same: the request is recorded (who asked), as the router applies it. Worded as the
        # API's answer to POST /v1/alerts/{id}/reassign.
        if held is not None and (note := reassign_note(present, unchanged=held.owner == present,
                                                       closed=held.status == "closed")):
            say(f"note: {note}", stderr=True)

    send_outcome({"type": "reassigned", "alert_id": alert_id, "actor": by, "owner": to, "note": reason}, settings,
                 options=REASSIGN_OPTIONS, before_publishing=check_alert)


class Held(NamedTuple):
    """What the store has of an alert now, for the commands' checks before they publish an event about it."""

    owner: str
    status: str
    outcome_at: datetime | None
    created_at: datetime
    predicted_at: datetime


def _held_or_exit(settings: Settings, alert_id: str) -> Held | None:
    """The alert as the store has it (None: the store cannot say); exit 2, nothing sent, when the store has no such
    alert: the router would dead-letter the event (unknown_alert), and "recorded" would read as done."""
    from decision_router.settings import redact_url

    held = _held(settings, alert_id)
    if held is _NO_SUCH_ALERT:
        # Worded as `audit`.
        fail(f"no alert {alert_id!r} in the store at {redact_url(settings.database_url)}; nothing was sent", code=2)
    return held if isinstance(held, Held) else None


def alert_check(settings: Settings, document: dict[str, Any]) -> Callable[[], None]:
    """`outcome TYPE --alert ID`'s check before it publishes (send_outcome's before_publishing), as `reassign`'s:
    an alert id the store lacks is an error; so is an `--at` before the alert was created (an outcome: before its
    prediction), beyond the clock skew, and an acknowledgement or intervention after the alert's outcome, which the
    router refuses (nobody acts before the alert exists; an action after the outcome cannot have caused it)."""
    from decision_router.contracts import OutcomeEvent, OutcomeType

    def check() -> None:
        event = OutcomeEvent.model_validate({k: v for k, v in document.items() if v is not None})  # valid by now
        if event.alert_id is None:
            return
        held = _held_or_exit(settings, event.alert_id)
        if held is None:
            return
        if event.at is not None:
            # As the router's gate (pipeline._dated_before), which dead-letters it as schema.
            since, what = ((held.predicted_at, "was predicted") if event.type is OutcomeType.OUTCOME
                           else (held.created_at, "was created"))
            if event.at < since - settings.max_clock_skew:
                fail(f"alert {event.alert_id!r} {what} at {_when(since)}: {event.type.value} --at {_when(event.at)} "
                     "is before it, and the router would refuse it; nothing was sent", code=2)
        if held.outcome_at is None or event.type not in (OutcomeType.ACKNOWLEDGED, OutcomeType.INTERVENED):
            return
        at = event.at or datetime.now(UTC)
        if at > held.outcome_at:
            when = f"--at {_when(at)}" if event.at is not None else f"now ({_when(at)}; give --at if it was earlier)"
            fail(f"alert {event.alert_id!r} has its outcome since {_when(held.outcome_at)}: {event.type.value} "
                 f"{when} is after it, and the router would refuse it; nothing was sent", code=2)

    return check


_NO_SUCH_ALERT = "no such alert"  # _held: the store answered, and has no alert by that id


def _held(settings: Settings, alert_id: str) -> Held | str | None:
    """The alert as the store has it now, _NO_SUCH_ALERT when the store has no such alert, or None when it
    cannot say (no store file, no alerts table, the store unreachable): then the router says what it made of
    the event, and this is never an error of its own."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlmodel import Session

    from decision_router.cli_common import missing_store_file
    from decision_router.store import make_engine
    from decision_router.tables import AlertRecord, as_utc

    if missing_store_file(settings.database_url) is not None:
        return None  # opening it would create it
    # A note is not worth the store's 10 s wait for a PostgreSQL that does not answer (unless the URL says).
    quick = {"connect_args": {"connect_timeout": 2}} if settings.database_url.startswith("postgresql") and \
        "connect_timeout" not in settings.database_url else {}
    engine = make_engine(settings.database_url, **quick)
    try:
        with Session(engine) as session:
            record = session.get(AlertRecord, alert_id)
            if record is None:
                return _NO_SUCH_ALERT
            outcome_at = as_utc(record.outcome_at)
            return Held(record.owner, record.status, outcome_at, as_utc(record.created_at), as_utc(record.predicted_at))
    except SQLAlchemyError:
        return None  # no alerts table yet, or no store to reach: the router will say what it made of it
    finally:
        engine.dispose()


# rules test ----------------------------------------------------------------------------


def _print_case(result: Any) -> None:
    from decision_router.durations import format_duration
    from decision_router.explain import COOLDOWN_NOTE, context_text

    case, explanation = result.case, result.explanation
    if explanation is None:
        return
    count = len(explanation.matches)
    say(f"{explanation.prediction_id} ({case.source}): {counted(count, 'rule')} match{'es' if count == 1 else ''}",
        style="bold")
    if result.lookup_dropped:
        say(f"   lookup over the router's limits, missing as when routed: {', '.join(result.lookup_dropped)}")
    for n, m in enumerate(explanation.matches, start=1):
        lines = [
            f"{n}. {m.rule}",
            f"   owner     {m.owner} ({m.owner_why})",
            f"   priority  {m.priority}   action {m.action}   {m.treatment}"
            + ("  (held out: recorded, not delivered)" if m.held_out else ""),
            f"   cooldown  {format_duration(m.cooldown) + ' (' + COOLDOWN_NOTE + ')' if m.cooldown else '-'}",
            f"   ack by    {_when(m.ack_by)} ({format_duration(m.ack_within)})",
            f"   act by    {_when(m.act_by)} ({format_duration(m.act_within)})",
            f"   context   {context_text(m.context)}",
            f"   missing   {', '.join(m.missing_context) or '-'}",
        ]
        say("\n".join(lines))


@rules_app.command("test")
def rules_test(
    prediction: Annotated[
        str | None, typer.Argument(metavar="PREDICTION", help="A prediction as JSON; '-' or nothing reads stdin.")
    ] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", exists=True, dir_okay=False,
        help="A JSON object, a JSON array or JSON lines; CSV with a header row (as publish reads it) if named *.csv.",
    )] = None,
    rules: Annotated[Path | None, typer.Option("--rules", help="Rules directory (default: DECISION_ROUTER_RULES_DIR).")] = None,
    expect_rule: Annotated[list[str] | None, typer.Option("--expect-rule", help="Rules that must match (repeat or a,b).")] = None,
    expect_owner: Annotated[list[str] | None, typer.Option("--expect-owner", help="Owners that must be chosen (repeat or a,b).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Which rules match a prediction, who owns it and why; exit 1 when --expect-* do not hold."""
    from decision_router.explain import (
        as_document,
        csv_cases,
        exit_code,
        parse_inputs,
        run_cases,
        split_expectations,
    )
    from decision_router.pipeline import utcnow
    from decision_router.publisher import FileFormatError

    _format(fmt)
    if file is not None and prediction is not None:
        fail("give the prediction as an argument or --file, not both", code=2)
    directory = rules or settings_or_exit().rules_dir
    ruleset = _ruleset_or_exit(directory, given=rules is not None)
    # A byte that is not UTF-8 fails its own prediction (the gate: invalid_encoding), not the whole input;
    # stdin is read as bytes too, as its text decoding (and so what a bad byte does) depends on the locale.
    if file is not None and file.suffix.lower() == ".csv":  # a CSV by its extension, as `publish --format auto`
        try:
            cases = csv_cases(file)
        except FileFormatError as exc:
            fail(str(exc), code=2)
    else:
        if file is not None:
            text, source = file.read_bytes().decode("utf-8-sig", "surrogateescape"), str(file)
        elif prediction not in (None, "-"):
            text, source = prediction, "argument"  # type: ignore[assignment]
        else:
            if sys.stdin is None:  # started with stdin closed (`<&-`): Python then has no sys.stdin at all
                fail("no stdin to read the prediction from: give it as an argument, with --file, or on a pipe", code=2)
            if sys.stdin.isatty():
                say("reading predictions from stdin (end with Ctrl-D)", stderr=True)
            text, source = sys.stdin.buffer.read().decode("utf-8-sig", "surrogateescape"), "stdin"
        cases = parse_inputs(text, source)
    rule_names, owner_ids = split_expectations(expect_rule), split_expectations(expect_owner)
    # A name that is in the rules nowhere (a typo) can never be met: said as such, not as a mismatch per case.
    unknown = [
        f"{option}: " + what.format(name=name, rules=_as_directory(directory)) + did_you_mean(name, known)
        for option, expected, known, what in (
            ("--expect-rule", rule_names, [rule.name for rule in ruleset.rules], "no rule is called '{name}' in {rules}"),
            ("--expect-owner", owner_ids, list(ruleset.owners), "'{name}' is not in the owner directory ({rules})"),
        )
        for name in dict.fromkeys(expected) if name not in known
    ]
    for problem in unknown[:-1]:
        err.print(Text.assemble(("error:", "bold red"), " ", problem), highlight=False, soft_wrap=True)
    if unknown:
        fail(unknown[-1], code=2)
    now = utcnow()
    results = run_cases(cases, ruleset, now=now, rules=rule_names, owners=owner_ids)
    if fmt == "json":
        _json(as_document(results, ruleset, now=now, rules=rule_names, owners=owner_ids))
    else:
        say(f"rules in {_as_directory(directory)} (version {ruleset.version}), evaluated at {_when(now)}")
        for result in results:
            _print_case(result)
    for result in results:
        if result.case.rejection is not None:
            rejection = result.case.rejection
            say(f"error: {result.case.source}: invalid prediction: {rejection.reason.value}: {rejection.detail}",
                stderr=True)
        for problem in result.mismatches:
            say(f"mismatch: {problem}", stderr=True)
    code = exit_code(results)
    if code == 0 and (rule_names or owner_ids):
        say("expectations met", stderr=True)
    raise typer.Exit(code)


# rules replay --------------------------------------------------------------------------

_CHANGED = {"rule": "rule changed", "owner": "owner changed", "priority": "priority changed", "action": "action changed"}


@rules_app.command("replay")
def rules_replay(
    rules: Annotated[Path, typer.Option("--rules", help="The candidate rules directory.")],
    since: Annotated[str, typer.Option(help="Predictions received since: 7d, 24h or an ISO date.")] = "7d",
    until: Annotated[str | None, typer.Option(help="...and before: a duration ago or an ISO date (default: now).")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Examples shown per kind of change.")] = 5,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Route stored predictions through candidate rules and compare with what happened. Writes nothing."""
    from decision_router.audit import iso
    from decision_router.replay import replay, replay_store
    from decision_router.rules import RulesInvalid, load_rules

    _format(fmt)
    candidate = _ruleset_or_exit(rules)
    settings = settings_or_exit()
    start, end = _window(since, until)
    from decision_router.enrich import referenced_fields

    # The fields of each context source the current rules read: the only ones stored (enrich.py).
    kept: dict[str, tuple[str, ...]] | None
    try:
        current_rules = load_rules(settings.rules_dir)
        current: str | None = current_rules.version
        kept = referenced_fields(current_rules)
    except RulesInvalid:
        current, kept = None, None
    with read_store(settings) as session:
        if session is None:
            report = replay([], {}, candidate)  # no store yet: nothing received
        else:
            report = replay_store(session, candidate, since=start, until=end, examples=examples, kept=kept)
    window = f"{_when(start)} .. {_when(end) if end else 'now'}"
    if fmt == "json":
        _json({"since": iso(start), "until": iso(end),
               "candidate_rules_dir": str(rules), "current_rules_dir": str(settings.rules_dir),
               "current_rules_version": current, **report.as_dict()})
        return
    say(f"candidate rules in {_as_directory(rules)} (version {candidate.version}); "
        f"current rules in {_as_directory(settings.rules_dir)} (version {current or 'n/a: they do not load'})")
    if not report.replayed:
        say(f"no predictions received in {window}: nothing to replay")
        return
    versions = ", ".join(f"{v} ({n})" for v, n in sorted(report.recorded_versions.items()))
    say(f"replayed {counted(report.replayed, 'prediction')} received in {window}, routed then by rules {versions}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("what")
    table.add_column("predictions", justify="right")
    table.add_row("replayed", str(report.replayed))
    table.add_row("unchanged", str(report.unchanged))
    for aspect, label in _CHANGED.items():
        table.add_row(label, str(report.changed.get(aspect, 0)))
    out.print(table)
    if report.missing_lookups:
        sources = ", ".join(f"{name} ({counted(n, 'prediction')})" for name, n in report.missing_lookups.items())
        say(f"replayed without looked-up context they were not stored with (lookup.* fields missing): {sources}")
    for aspect, label in _CHANGED.items():
        shown = report.examples.get(aspect, ())
        if not shown:
            continue
        say(f"\n{label}: {len(shown)} of {report.changed[aspect]} shown")
        for change in shown:
            say(f"  {change.prediction_id}  {change.entity}  {change.before} -> {change.after}")
