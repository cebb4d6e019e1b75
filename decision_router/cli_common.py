"""What the `decision-router` commands share: the typer `app` and `rules` group, the consoles, the error
exits (one line, an exit code) and the helpers that read settings, open Redis and the store, and send an
outcome event.

cli.py and the command modules (cli_stats.py, cli_governance.py, ...) import this module, and it imports
none of them: the imports go one way, so any of them can be imported on its own. The commands are
registered on `app` when their module is imported; cli.py imports them all. `--help` lists them in the
order given to `app` (and each group), whichever module was imported first.
"""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from decision_router.echo import cap_digits, counted, validation_problems
from decision_router.keys import Keys

if TYPE_CHECKING:
    # Every command is registered at import, so `decision-router <cmd>` and --help start fast only if
    # nothing heavy is imported here: redis, pydantic (settings, contracts), structlog, SQLAlchemy,
    # the service modules are imported in the command that uses them (tests/unit/test_cli_startup.py).
    from redis.asyncio import Redis

    from decision_router.settings import Settings


class _Utf8Only:
    """After parsing, a text value that is not valid UTF-8 is refused, naming its option. On POSIX, Python
    reads argument bytes that are not UTF-8 (`$'al-\\xff'`) as lone surrogates, which no stream, store or
    terminal takes: every command would fail later, each in its own way."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)  # type: ignore[misc]
        for param in self.params:  # type: ignore[attr-defined]
            value = ctx.params.get(param.name)
            if not all(_is_utf8(v) for v in (value if isinstance(value, (list, tuple)) else [value])):
                name = param.opts[0] if param.param_type_name == "option" else (param.metavar or param.name.upper())
                fail(f"{name.strip('[]')}: not valid UTF-8", code=2)
        return rest


def _is_utf8(value: object) -> bool:
    if not isinstance(value, str) or value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Utf8Command(_Utf8Only, TyperCommand):
    pass


class Utf8Group(_Utf8Only, TyperGroup):
    # The order `--help` lists the commands in (App's `order`); the rest follow in typer's order, that of
    # registration, which is the order their modules were first imported in: a process that imported
    # cli_stats.py before cli.py listed `stats` ahead of `redrive`.
    order: tuple[str, ...] = ()

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(self.order)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """As TyperGroup.main, with usage errors (an unknown option, a missing argument, a bad value) as
        click's plain lines: Typer draws them in a Rich box, and every other message here is a plain line
        a script can grep. Only the errors: --help keeps Rich's formatting (its own rich_markup_mode).
        typer.core._main is what TyperGroup.main calls; there rich_markup_mode only picks how errors show."""
        return typer.core._main(
            self, args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=standalone_mode,
            rich_markup_mode=None, **extra,
        )

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # Typer's help and exit 2, without the empty error line click's plain NoArgsIsHelpError adds
            # after it: Rich prints the help itself (get_help then returns "").
            help_text = ctx.get_help()
            if help_text:
                typer.echo(help_text, err=True)
            raise typer.Exit(2)
        return super().parse_args(ctx, args)


class App(typer.Typer):
    """typer.Typer whose commands, and groups with options of their own (`stats`), take only UTF-8 text.
    `order`: the names of its commands and groups, in the order `--help` lists them."""

    def __init__(self, *, order: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(cls=type("Utf8Group", (Utf8Group,), {"order": tuple(order)}), **kwargs)

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Utf8Command, **kwargs)


app = App(
    help="Route model predictions to named owners, track what they did and whether it worked.",
    # The commands first, then the groups, as typer lists them when cli.py imports the command modules.
    order=("serve", "demo", "publish", "outcome", "health", "audit", "reassign", "simulate", "api", "asyncapi",
           "bench", "rules", "redrive", "stats", "tokens"),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(asked: bool) -> None:
    """`--version`: the installed package's version (its metadata, as pip shows it), then exit 0."""
    if not asked:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("decision-router")
    except PackageNotFoundError:
        fail("the decision-router package is not installed, so it has no version: pip install -e . in the checkout")
    typer.echo(f"decision-router {installed}")
    raise typer.Exit()


@app.callback()
def _root(
    _version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """The options before any command (only --version); each command parses its own."""


rules_app = App(
    help="Check the routing rules and owner directory, test them on a prediction, replay stored predictions.",
    order=("check", "test", "replay"),  # check in cli.py, test and replay in cli_governance.py
    no_args_is_help=True,
)
app.add_typer(rules_app, name="rules")


class _Console(Console):
    """A Console whose messages (text, not tables) are never wrapped when they go to a file or a pipe:
    there Rich would wrap them at 80 (or `width`) columns, and a script grepping `FILE:LINE: skipped: ...`
    would get half a line. On a terminal they wrap to its width as before.

    A table narrower than its cells' longest words is printed at its natural width, and the terminal wraps
    its lines: Rich squeezed it, and on an 80-column terminal the stats table's counts showed blank, on a
    100-column one cut ('1…' for 100). (At its minimum width Rich's layout still cuts cells: hence natural.)"""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, (str, Text)) for o in objects):
            soft_wrap = True
        needed = self._width_for_tables(objects)
        if needed <= self.width:
            super().print(*objects, soft_wrap=soft_wrap, **kwargs)
            return
        width = self._width
        self.width = needed
        try:
            super().print(*objects, soft_wrap=soft_wrap, crop=False, **kwargs)
        finally:
            self._width = width

    def _width_for_tables(self, objects: Sequence[Any]) -> int:
        """The natural width of the widest table in `objects` that cannot fit this console uncut; 0 if none."""
        from rich.measure import Measurement
        from rich.table import Table

        unbounded = self.options.update_width(10_000)
        sizes = [Measurement.get(self, unbounded, o) for o in objects if isinstance(o, Table)]
        return max((size.maximum for size in sizes if size.minimum > self.width), default=0)


# Tables are wide: when output is piped, do not squeeze them into 80 columns.
# What the commands print holds user and stored text (ids, names, regexes, file lines): never read
# as Rich markup or emoji codes, so '[/]' or ':smile:' is shown as typed instead of failing or changing.
out = _Console(width=None if sys.stdout.isatty() else 160, markup=False, emoji=False)
err = _Console(stderr=True, markup=False, emoji=False)


def fail(message: str, code: int = 1) -> NoReturn:
    # A 400-digit number given on the command line is quoted by its start and length, not in full.
    err.print(Text.assemble(("error:", "bold red"), " ", cap_digits(message)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_or_exit(*, log_level: str | None = None, options: Mapping[str, tuple[str, Any]] | None = None) -> Settings:
    """The settings, or exit 2 with one line naming the bad variable. `options`: command-line options that
    override a setting, as {"--port": ("api_port", value)} (None: not given); they are checked as the
    variable is, and an error names the option."""
    from decision_router.logs import configure_logging
    from decision_router.settings import ENV_PREFIX, SettingsError, load_settings

    options = options or {}
    try:
        settings = load_settings(**{field: value for field, value in options.values() if value is not None})
    except SettingsError as exc:
        message = str(exc)
        for option, (field, value) in options.items():
            if value is not None:
                message = message.replace(f"{ENV_PREFIX}{field.upper()}:", f"{option}:")
        fail(message, code=2)
    configure_logging(fmt=settings.log_format, level=log_level or settings.log_level)
    return settings


def fail_rules(settings: Settings, exc: Exception, *, starting: bool = False) -> NoReturn:
    """Exit 1 on rules that do not load. A missing directory is said as such: the default, `rules`, is
    relative to the working directory, so `serve` run outside the checkout read "the rules in rules are
    invalid" followed by a "not found" line per file."""
    prefix = "refusing to start: " if starting else ""
    if not settings.rules_dir.is_dir():
        fail(prefix + no_rules_directory(settings.rules_dir, given=False))
    fail(f"{prefix}the rules in {settings.rules_dir} are invalid:\n{exc}")


def no_rules_directory(directory: Path, *, given: bool) -> str:
    """The one line for a rules directory that does not exist; `given`: named on the command line, so the
    variable and its default are no part of the story."""
    where = f"no rules directory at {directory.resolve()}"
    if given:
        return where
    return (f"{where} (DECISION_ROUTER_RULES_DIR, default: rules in the working directory): run this in the "
            "checkout, or set DECISION_ROUTER_RULES_DIR")


def smtp_or_exit(settings: Settings) -> None:
    """Exit 2 with one line naming the variable when the email channel cannot use its settings (a password
    file it cannot read): at start, before `serve` or `api` would stop on it with a traceback."""
    from decision_router.notify import smtp_settings
    from decision_router.settings import SettingsError

    try:
        smtp_settings(settings)
    except SettingsError as exc:
        fail(str(exc), code=2)


def fail_store(database_url: str, exc: Exception, *, doing: str = "open") -> NoReturn:
    """Exit 1: the store at `database_url` cannot be opened (e.g. its directory does not exist), or `doing`
    else (e.g. "read", "write to": a read-only file); passwords masked, on one line."""
    from decision_router.settings import redact_text, redact_url

    reason = redact_text(str(getattr(exc, "orig", None) or exc)).strip()
    # One line: libpq's hint goes on an indented line of its own ("Is the server running on that host...").
    reason = re.sub(r"\s*\n\s*", "; ", reason)
    fail(f"cannot {doing} the store at {redact_url(database_url)}: {reason}")


def missing_store_file(database_url: str) -> Path | None:
    """The SQLite file `database_url` names, when it does not exist (opening it would create it)."""
    if not database_url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    from decision_router.settings import SQLITE_TRUE

    url = make_url(database_url)
    name = url.database or ""
    if str(url.query.get("uri", "")).strip().lower() in SQLITE_TRUE and name.startswith("file:"):
        # A URI (settings checks that SQLite's own options come with one): file:PATH, or file:///PATH.
        name = name.removeprefix("file:")
        if name.startswith("//"):
            authority, _, rest = name[2:].partition("/")
            if authority not in ("", "localhost"):
                return None  # another host's file: SQLite refuses it itself
            name = "/" + rest
    if name in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    path = Path(name)
    return None if path.exists() else path


def existing_store_or_exit(database_url: str) -> None:
    """Exit 1 when `database_url` names an SQLite file that does not exist. A command that only reads the
    store or changes what is in it (`stats`, `audit`, `health`, `tokens list`, `tokens revoke`, `redrive
    deliveries`) run outside the directory `serve` runs in would otherwise create an empty store there (the
    default `decision_router.db` is relative to the working directory) and report "no alerts", or "ok"."""
    path = missing_store_file(database_url)
    if path is not None:
        from decision_router.settings import redact_url

        where = "" if path.is_absolute() else f" ({path.resolve()})"
        fail(
            f"no store at {redact_url(database_url)}{where}: no such file (`serve` creates it in its working "
            "directory: run this there, or set DECISION_ROUTER_DATABASE_URL)"
        )


def no_gc_until_done(ctx: typer.Context) -> None:
    """No cyclic garbage collection until the command `ctx` runs has finished: for short commands
    that read and print. Their imports (SQLAlchemy, the pydantic and SQLModel classes) create
    hundreds of thousands of objects that each collection walks again, ~10% of the start-up;
    reference counting still frees what they discard. Collection resumes when `ctx` closes."""
    if gc.isenabled():
        gc.disable()
        ctx.call_on_close(gc.enable)


async def _connect(settings: Settings) -> Redis:
    from decision_router.redis_client import REDIS_ERRORS, redis_for
    from decision_router.settings import redact_url

    redis = redis_for(settings)
    try:
        await redis.ping()
    except (*REDIS_ERRORS, OSError) as exc:
        await redis.aclose()
        hint = (
            " (no DECISION_ROUTER_REDIS_URL is set, so this is the embedded Redis: is `decision-router serve` running?)"
            if settings.embedded
            else ""
        )
        fail(f"cannot reach Redis at {redact_url(settings.effective_redis_url)}: {exc}{hint}")
    return redis


T = TypeVar("T")


INTERRUPT_GRACE_S = 1.0  # after Ctrl-C, how long a command may take to stop by itself


def run_interruptibly(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, where Ctrl-C always stops `main`: it is cancelled, and cancelled again every
    INTERRUPT_GRACE_S while it keeps running (a cancellation can be lost inside an await that
    completes at the same moment: seen under load, the demo then ran to its end). The outcome
    is KeyboardInterrupt (exit 130), as with asyncio.run, even when `main` finishes anyway (Ctrl-C
    during its last synchronous step, or a cancellation lost for good): the demo then printed
    the rest of its report and exited 0 as if Ctrl-C had not been pressed."""
    import asyncio
    import signal

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            if not task.done():
                task.cancel()
                loop.call_later(INTERRUPT_GRACE_S, interrupt)

        loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            result = await main
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        if interrupted:
            raise KeyboardInterrupt
        return result

    return asyncio.run(guarded())


def run_on_redis(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """run_interruptibly(main), where a Redis command failing after _connect (a node going away, or a plain
    client redirected by a cluster node: MOVED) is one error line (exit 1), not a traceback."""
    from decision_router.redis_client import REDIS_ERRORS, cluster_hint
    from decision_router.settings import redact_text, redact_url

    try:
        return run_interruptibly(main)
    except REDIS_ERRORS as exc:
        reason = redact_text(str(exc))
        fail(f"Redis at {redact_url(settings.effective_redis_url)} failed: {reason}{cluster_hint(exc)}")


# The most accounts `demo` and `simulate` take: a mistyped number is refused rather than run for hours.
MAX_SIMULATED_ENTITIES = 100_000


# outcome events: the `outcome` command (cli.py) and `reassign` (cli_governance.py) ---------------


class OptionNames(NamedTuple):
    """How a command names an outcome event's fields (field -> option) and words the contract's whole-event
    rules (the rule's message -> the command's), for its error messages."""

    fields: Mapping[str, str]
    rules: Mapping[str, str]


# An outcome event's fields and rules as the `outcome` command names them
# (tests/unit/test_cli_messages.py breaks each rule, so a reworded one is noticed).
OUTCOME_OPTIONS = OptionNames(
    fields={
        "type": "TYPE", "actor": "--actor", "alert_id": "--alert", "prediction_id": "--prediction",
        "entity_type": "--entity", "entity_id": "--entity", "action": "--action", "result": "--result",
        "value": "--value", "owner": "--owner", "note": "--note", "at": "--at",
    },
    rules={
        "address the event by exactly one of alert_id, prediction_id, or entity_type+entity_id":
            "address the event by exactly one of --alert, --prediction or --entity",
        "an outcome event needs result: success or failure": "TYPE outcome needs --result success or failure",
        "result is only allowed on type: outcome": "--result is only allowed with TYPE outcome",
        "a reassigned event needs owner: the new owner's id": "TYPE reassigned needs --owner: the new owner's id",
        "owner is only allowed on type: reassigned": "--owner is only allowed with TYPE reassigned",
    },
)
# As `reassign ALERT_ID --to OWNER --by ACTOR --reason NOTE` names them: it has no --actor or --owner.
REASSIGN_OPTIONS = OptionNames(
    fields={"alert_id": "ALERT_ID", "actor": "--by", "owner": "--to", "note": "--reason"},
    rules={"a reassigned event needs owner: the new owner's id": "--to needs the new owner's id"},
)


def _outcome_problems(exc: Any, options: OptionNames | None) -> str:
    """An invalid outcome event's problems, naming the command's `options` instead of the event's fields."""
    if options is None:
        return validation_problems(exc, nameless="event")
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            where = options.fields.get(str(error["loc"][0])) or ".".join(str(part) for part in error["loc"])
            parts.append(f"{where}: {message}")
        else:
            parts.append(options.rules.get(message, message))
    return "; ".join(parts)


def parse_entity(entity: str) -> tuple[str, str]:
    """`account:acct-17` -> ("account", "acct-17"); anything else is a usage error."""
    entity_type, sep, entity_id = entity.partition(":")
    if not sep or not entity_type or not entity_id:
        fail(f"--entity must look like TYPE:ID (e.g. account:acct-17), not {entity!r}", code=2)
    return entity_type, entity_id


def send_outcome(
    document: dict[str, Any], settings: Settings | None = None, *, options: OptionNames | None = None,
    before_publishing: Callable[[], None] | None = None,
) -> None:
    """Validate an outcome event (exit 2 when invalid, or when the router's gate would dead-letter it)
    and publish it on the outcomes stream. `options`: how the command names the fields, for errors;
    `before_publishing`: the command's own checks of a valid event (it may exit)."""
    from pydantic import ValidationError

    from decision_router.contracts import OutcomeEvent, Rejection
    from decision_router.publisher import describe, outcome_fields, publish_outcome
    from decision_router.quality import check_outcome

    try:
        event = OutcomeEvent.model_validate({k: v for k, v in document.items() if v is not None})
    except ValidationError as exc:
        fail(f"invalid outcome event: {_outcome_problems(exc, options)}", code=2)
    settings = settings or settings_or_exit()
    stream = Keys(settings.stream_prefix).outcomes
    # The router's own gate, on the entry as it will be written: an empty id, a note over the size limit...
    # are refused here instead of being "recorded" and then dead-lettered.
    # With now and the skew, as the router: an `at` in the future is refused here, not dead-lettered there.
    checked = check_outcome(outcome_fields(event), source_stream=stream, limits=settings.payload_limits,
                            now=datetime.now(UTC), max_skew=settings.max_clock_skew)
    if isinstance(checked, Rejection):
        fail(f"invalid outcome event: the router would reject it as {describe(checked)}", code=2)
    if before_publishing is not None:
        before_publishing()

    async def run() -> str:
        redis = await _connect(settings)
        try:
            return await publish_outcome(redis, stream, event)
        finally:
            await redis.aclose()

    entry_id = run_on_redis(settings, run())
    out.print(f"recorded {event.type.value} on {stream} as entry {entry_id}")


# shared by the stats and governance commands ----------------------------------------------


def _window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """--since and --until read by _since; an empty window is a mistake to say, not "no data"."""
    start, end = _since(since, "--since"), _since(until, "--until")
    if start is not None and end is not None and start >= end:
        fail(f"--until ({until}) must be after --since ({since})", code=2)
    return start, end


def _since(value: str | None, option: str) -> datetime | None:
    """`7d` (relative to now) or an ISO-8601 date/time; a bad one exits 2 with an error naming `option`."""
    if value is None:  # before any import: the pipeline module alone costs a `stats` run ~0.5 s
        return None
    from decision_router.durations import parse_since
    from decision_router.pipeline import utcnow

    try:
        return parse_since(value, now=utcnow())
    except ValueError as exc:
        fail(f"{option}: {exc}", code=2)


def fail_with_problems(problems: list[Any], directory: Path, *, given: bool = True) -> NoReturn:
    """Every problem of a rules directory on stderr, then exit 1; a directory that does not exist in one
    line, as `serve` says it, not a "not found" per file. `given`: as for no_rules_directory."""
    if not directory.exists():  # a file is reported by the loader: "is a file: give the rules directory"
        fail(no_rules_directory(directory, given=given))
    for problem in problems:
        err.print(str(problem), highlight=False, soft_wrap=True)
    err.print(f"{counted(len(problems), 'problem')} in {directory}", style="bold red")
    raise typer.Exit(1)
