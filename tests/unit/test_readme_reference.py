"""README.md's reference tables say what the code does: every setting with its default and range, every CLI
command and option, the stream contracts' fields, the dead-letter reasons, the stats columns and the HTTP
endpoints. A table that drifts from the code fails here, naming the row, before a user follows it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from annotated_types import Ge, Le

from decision_router import cli
from decision_router.contracts import Alert, OutcomeEvent, Prediction, RejectionReason
from decision_router.durations import parse_duration
from decision_router.settings import DURATION_FLOORS, ENV_PREFIX, Settings, load_settings
from decision_router.stats import GroupBy, stats_columns

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
API_DOC = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The body of the section `heading` (e.g. "## Configuration"), up to the next heading of its level or above."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start:], re.MULTILINE)]
    return text[start : start + ends[0]] if ends else text[start:]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of every Markdown table in `text`, as cells (`\\|` inside a cell is not a separator)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|[-| :]+\|", line.strip()):
            continue
        rows.append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    headers = ("variable", "command", "field", "reason", "column", "method and path")
    return [row for row in rows if row[0] not in headers]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# Configuration -------------------------------------------------------------------------------------------

CONFIG_ROWS = [row for row in table_rows(section(README, "## Configuration")) if ENV_PREFIX in row[0]]


def variable_field(variable: str) -> str:
    return variable.removeprefix(ENV_PREFIX).lower()


def test_the_settings_table_lists_every_setting_and_no_other() -> None:
    documented = {v for row in CONFIG_ROWS for v in code_spans(row[0]) if v.startswith(ENV_PREFIX)}
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert documented - settings == set(), "in README's Configuration table but not in decision_router/settings.py"
    assert settings - documented == set(), "in decision_router/settings.py but not in README's Configuration table"


def documented_default(cell: str, value: Any) -> Any:
    """The README default `cell`, read as the setting's type (that of its actual `value`)."""
    if cell.startswith("unset"):
        return None
    if cell == "empty":
        return ""
    (text,) = code_spans(cell)
    if isinstance(value, bool):
        return {"true": True, "false": False}[text]
    if isinstance(value, timedelta):
        return parse_duration(text)
    return type(value)(text)


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=lambda row: code_spans(row[0])[0])
def test_each_documented_default_is_the_settings_default(row: list[str]) -> None:
    settings = load_settings()  # tests/conftest.py keeps the developer's DECISION_ROUTER_* out
    for variable in (v for v in code_spans(row[0]) if v.startswith(ENV_PREFIX)):
        value = getattr(settings, variable_field(variable))
        if variable == f"{ENV_PREFIX}CONSUMER_NAME":
            assert row[1] == "`<hostname>-<pid>`" and value == f"{socket.gethostname()}-{os.getpid()}"
        elif variable == f"{ENV_PREFIX}API_MAX_BODY_BYTES":
            from decision_router.api.limits import max_body_bytes

            assert row[1] == f"`{ENV_PREFIX}MAX_PAYLOAD_BYTES` x 1000"
            assert value is None and max_body_bytes(settings) == settings.max_payload_bytes * 1000
        else:
            assert documented_default(row[1], value) == value, f"{variable}: README says {row[1]}, the code {value!r}"


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=lambda row: code_spans(row[0])[0])
def test_each_documented_range_is_the_settings_range(row: list[str]) -> None:
    (variable, *others) = [v for v in code_spans(row[0]) if v.startswith(ENV_PREFIX)]
    ranges = re.findall(r"(?<![\w.])(\d+)(?:\.\.|-)(\d+)(?![\w.])", row[2])
    lower = re.findall(r"`>= (\d+)`", row[2])
    if not (ranges or lower):
        return
    assert not others, f"a range on a row of several settings: {row[0]}"
    bounds = {type(m): m for m in Settings.model_fields[variable_field(variable)].metadata}
    low, high = (ranges[0] if ranges else (lower[0], None))
    assert Ge in bounds and bounds[Ge].ge == int(low), f"{variable}: README's lowest is {low}"
    if high is not None:
        assert Le in bounds and bounds[Le].le == int(high), f"{variable}: README's highest is {high}"


DURATION_FLOOR = re.compile(r"`>= (\d+(?:\.\d+)?[smhdw])`")


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=lambda row: code_spans(row[0])[0])
def test_each_documented_duration_floor_is_the_settings_floor(row: list[str]) -> None:
    """A duration's shortest value as README shows it (`>= 1s`) is the one the settings enforce, and README
    gives `0` a meaning (`0` = off) exactly where the settings take 0."""
    variable = next(v for v in code_spans(row[0]) if v.startswith(ENV_PREFIX))
    floor = DURATION_FLOORS.get(variable_field(variable))
    documented = DURATION_FLOOR.findall(row[2])
    if documented:
        assert floor is not None, f"{variable}: README gives a shortest value, the settings none"
        assert parse_duration(documented[0]) == floor.least, f"{variable}: README's shortest is {documented[0]}"
    if floor is not None:
        assert documented, f"{variable}: the settings refuse values under {floor.least}, README does not say so"
        assert ("`0` =" in row[2]) == floor.off, f"{variable}: README and the settings differ on what 0 means"


# CLI reference -------------------------------------------------------------------------------------------

CLI_ROWS = table_rows(section(README, "## CLI reference"))
ROOT_COMMAND = typer.main.get_command(cli.app)


def command_path(span: str) -> tuple[str, ...]:
    """`tokens revoke ID` -> ("tokens", "revoke"): the words before the first argument or option."""
    words = []
    for word in span.split():
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        words.append(word)
    return tuple(words)


def resolve(path: tuple[str, ...]) -> Any:
    command = ROOT_COMMAND
    for word in path:
        commands = getattr(command, "commands", {})
        assert word in commands, f"`decision-router {' '.join(path)}`: no command {word!r}"
        command = commands[word]
    return command


def leaf_paths(command: Any = ROOT_COMMAND, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    commands = getattr(command, "commands", None)
    if not commands:
        return {path}
    return {leaf for name, sub in commands.items() for leaf in leaf_paths(sub, (*path, name))}


def options_of(command: Any) -> set[str]:
    """Its options, and for a group (`stats`) its subcommands' too."""
    names = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    for sub in getattr(command, "commands", {}).values():
        names |= options_of(sub)
    return names


def bench_options() -> set[str]:
    """`bench` passes its arguments to benchmarks/run.py's argparse parser: its --help lists them."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", done.stdout))


def row_paths(row: list[str]) -> list[tuple[str, ...]]:
    """The commands of a row; () for a row of `decision-router`'s own options (`--version`)."""
    return [command_path(span) for span in code_spans(row[0])]


def test_every_command_in_the_cli_reference_exists_and_every_command_is_in_it() -> None:
    documented = {path for row in CLI_ROWS for path in row_paths(row) if path}
    for path in documented:
        resolve(path)
    undocumented = {leaf for leaf in leaf_paths() if not any(leaf[: len(d)] == d for d in documented)}
    assert undocumented == set(), "commands missing from README's CLI reference"


def test_the_options_of_decision_router_itself_are_in_the_cli_reference() -> None:
    """`decision-router --version`: an option given before any command has a row of its own."""
    documented = {span for row in CLI_ROWS for span in code_spans(row[0]) if span.startswith("-")}
    assert documented == {name for param in ROOT_COMMAND.params for name in param.opts}


@pytest.mark.parametrize("row", CLI_ROWS, ids=lambda row: code_spans(row[0])[0])
def test_each_documented_option_exists_with_its_default_and_range(row: list[str]) -> None:
    commands = [resolve(path) for path in row_paths(row)]
    known = set().union(*(options_of(c) for c in commands))
    if row_paths(row) == [("bench",)]:
        known = bench_options()
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])(?![\w-])", row[2]))
    assert documented - known == set(), f"{row[0]}: options README lists that `--help` does not"
    params = {name: p for c in commands for p in c.params for name in (*p.opts, *p.secondary_opts)}
    for option, default in re.findall(r"`(--[a-z-]+) (\d+d?)`", row[2]):
        assert str(params[option].default) == default, f"{option}: README's default {default}"
    for option, low, high in re.findall(r"`(--[a-z-]+)[^`]*` \((\d+)-(\d+)\)", row[2]):
        param = params[option]
        bounds = param if hasattr(param, "min") else param.type  # typer's own click, or click's IntRange
        assert (bounds.min, bounds.max) == (int(low), int(high)), f"{option}: README's range {low}-{high}"


# Contracts -----------------------------------------------------------------------------------------------


def first_column(heading: str) -> set[str]:
    return {span for row in table_rows(section(README, heading)) for span in code_spans(row[0])}


def test_the_prediction_table_is_the_prediction_contract() -> None:
    assert first_column("### Prediction") == set(Prediction.model_fields)


def test_the_alert_example_and_table_are_the_alert_contract() -> None:
    example = re.search(r"```json\n(\{.*?\})\n```", section(README, "### Alert"), re.DOTALL)
    assert example is not None
    import json

    assert set(json.loads(example.group(1))) == set(Alert.model_fields)
    assert first_column("### Alert") <= set(Alert.model_fields)


def test_the_outcome_event_tables_are_the_outcome_contract() -> None:
    documented = first_column("### Outcome events") - {"entity_type + entity_id"}
    documented |= {"entity_type", "entity_id"}
    assert documented == set(OutcomeEvent.model_fields)


def test_the_dead_letter_reasons_are_the_rejection_reasons() -> None:
    reasons = {span for row in table_rows(section(README, "### Dead-letter entries")) for span in code_spans(row[0])}
    reasons -= {"reason", "detail", "model", "source_stream", "source_id", "payload"}  # the entry's fields table
    assert reasons <= {r.value for r in RejectionReason}, "reasons README lists that the code never writes"
    assert {r.value for r in RejectionReason} <= reasons, "reasons the code writes that README does not list"


def test_the_stats_columns_are_what_stats_prints() -> None:
    every = {column for by in GroupBy for column in stats_columns(by)}
    assert first_column("### Columns") == every
    example = re.search(r"stats --rule churn-risk --format json\n\[\n  (\{.*?\n  \})\n\]", README, re.DOTALL)
    assert example is not None
    import json

    assert list(json.loads(example.group(1))) == stats_columns(GroupBy.RULE)


# HTTP API ------------------------------------------------------------------------------------------------


def normalized(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def app_routes() -> set[tuple[str, str]]:
    from decision_router.api.app import create_app
    from decision_router.rules import load_rules
    from decision_router.store import make_engine

    settings = load_settings()
    engine = make_engine("sqlite://")
    try:
        from redis.asyncio import Redis

        app = create_app(settings, engine=engine, redis=Redis(), ruleset=load_rules(ROOT / "rules"))
    finally:
        engine.dispose()
    return {(method, normalized(route.path)) for route in flat(app.routes) for method in route.methods
            if method != "HEAD"}


def flat(routes: list[Any]) -> list[Any]:
    """Every route with a path; FastAPI 0.16x keeps an included router whole (`original_router`)."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)
        found += flat(included.routes) if included is not None else [route] if hasattr(route, "methods") else []
    return found


def test_every_documented_endpoint_exists_and_every_endpoint_is_documented() -> None:
    routes = app_routes()
    table = table_rows(section(API_DOC, "## Endpoints"))
    documented = {(m, normalized(p)) for row in table for m, p in [code_spans(row[0])[0].split(" ", 1)]}
    assert documented - routes == set(), "in docs/api.md's endpoints table but not served"
    # The README and docs/api.md name each served path somewhere (the dashboard's in README "Dashboard").
    named = {normalized(p) for p in re.findall(r"(/(?:v1/)?[a-z][\w./{}-]*)", README + API_DOC)}
    served = {path for _, path in routes if path not in ("/", "/assets/{}")}  # the dashboard page itself
    assert served - named == set(), "served but named nowhere in README.md or docs/api.md"
