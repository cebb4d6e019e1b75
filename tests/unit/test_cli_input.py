"""Bad or unusual input on the command line gets one `error: ...` line and an exit code, never a traceback:
the CLI in-process (typer's CliRunner), on a SQLite store in a temporary directory and the shipped rules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from decision_router import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    (tmp_path / "store.db").touch()  # an SQLite store with no tables yet (a missing file is refused)
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(ROOT / "rules"))
    return tmp_path


SHIPPED_RULES = Path(__file__).resolve().parents[2] / "rules"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args))


def one_error(result: Result, code: int) -> str:
    """The single `error: ...` line of a refused command (no traceback behind it)."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# User text is shown as typed: never read as Rich markup or emoji codes -------------------------


@pytest.mark.parametrize(
    ("args", "code", "shown"),
    [
        (["stats", "--since", "[/]"], 2, "not '[/]'"),
        (["stats", "--by", "[/]"], 2, "not '[/]'"),
        (["stats", "--format", "[/]"], 2, "not '[/]'"),
        (["stats", "model", "--bands", "[/]"], 2, "not '[/]'"),
        (["audit", "[/]"], 1, "no alert '[/]'"),
        (["audit", "--entity", "a:[/bold]"], 1, "entity 'a:[/bold]'"),
        (["audit", "--entity", "a:b:c"], 1, "entity 'a:b:c'"),
        (["audit", ":smile:"], 1, "no alert ':smile:'"),
        (["reassign", "al-x", "--to", "[/]", "--by", "me"], 2, "owner '[/]'"),
        (["tokens", "create", "--role", "[/]"], 2, "role '[/]'"),
        (["tokens", "revoke", "[/]"], 2, "id '[/]'"),
        (["rules", "replay", "--rules", str(ROOT / "rules"), "--since", "[/]"], 2, "not '[/]'"),
    ],
)
def test_user_text_in_an_error_is_shown_literally(args: list[str], code: int, shown: str) -> None:
    assert shown in one_error(invoke(*args), code)


def test_a_token_named_like_markup_is_listed() -> None:
    created = invoke("tokens", "create", "--role", "ops", "--name", "[/]")
    assert created.exit_code == 0, created.output
    listed = invoke("tokens", "list")
    assert listed.exit_code == 0, listed.exception
    assert "[/]" in listed.stdout


def test_rules_check_lists_a_regex_holding_markup_as_written(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "owners.yaml").write_text("owners:\n  - {id: desk, name: Desk}\n")
    (rules / "routing.yaml").write_text(
        "rules:\n"
        '  - {name: a, when: {model: {regex: "(x)\\\\1[/]"}}, owner: desk}\n'
        '  - {name: b, when: {model: {regex: "[a-z]+(?=shadow)"}}, owner: desk}\n'
        "  - {name: rest, when: {}, owner: desk, action: record}\n"
    )
    for args in (["rules", "check", str(rules)], ["rules", "test", "--rules", str(rules), "{}"]):
        result = invoke(*args)
        assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
        assert "'(x)\\\\1[/]'" in result.stderr and "'[a-z]+(?=shadow)'" in result.stderr


# A port option is checked as DECISION_ROUTER_API_PORT is ----------------------------------------


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["api", "--port", "-1"], "error: --port: Input should be greater than or equal to 0"),
        (["api", "--port", "70000"], "error: --port: Input should be less than or equal to 65535"),
        (["serve", "--api-port", "70000"], "error: --api-port: Input should be less than or equal to 65535"),
    ],
)
def test_an_api_port_out_of_range_is_refused(args: list[str], shown: str) -> None:
    assert one_error(invoke(*args), 2) == shown


# A duration too short to work stops `serve` at start, as any bad setting does ------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("CLAIM_IDLE", "0", "error: DECISION_ROUTER_CLAIM_IDLE: must be at least 0.1s, not 0s: "),
        ("SWEEP_INTERVAL", "0", "error: DECISION_ROUTER_SWEEP_INTERVAL: must be at least 1s, not 0s: "),
        ("DEDUPE_TTL", "1h", "error: DECISION_ROUTER_DEDUPE_TTL (1h) must be at least twice DECISION_ROUTER_DRIFT_"),
    ],
)
def test_serve_refuses_a_duration_too_short_to_work(monkeypatch, variable: str, value: str, shown: str) -> None:
    monkeypatch.setenv(f"DECISION_ROUTER_{variable}", value)
    assert one_error(invoke("serve", "--no-api"), 2).startswith(shown)


# Typer's usage errors are plain lines, as every other message: no Rich box --------------------------------

BOX_DRAWING = re.compile("[\u2500-\u257f]")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["stats", "--nosuch"], "No such option: --nosuch"),
        (["stats", "nosuch"], "No such command 'nosuch'."),
        (["reassign", "al-1", "--by", "me"], "Missing option '--to'."),
        (["demo", "--predictions", "0"],
         "Invalid value for '--predictions': Input should be greater than or equal to 1"),
        (["stats", "model", "--model"], "Option '--model' requires an argument."),
    ],
)
def test_a_usage_error_is_plain_lines_naming_the_option(args: list[str], problem: str) -> None:
    result = CliRunner().invoke(cli.app, args, prog_name="decision-router")
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.exception
    assert not BOX_DRAWING.search(result.stderr), result.stderr
    assert result.stderr.splitlines()[-1] == f"Error: {problem}"
    if len(result.stderr.splitlines()) > 1:  # click has no usage line for an option missing its value
        command = " ".join(word for word in args if word in ("stats", "model", "reassign", "demo"))
        assert f"Try 'decision-router {command} --help' for help." in result.stderr.splitlines()


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["publish"], "publish [OPTIONS] {FILE}"),
        (["audit", "--nosuch"], "audit [OPTIONS] [ALERT_ID]"),
        (["reassign"], "reassign [OPTIONS] {ALERT_ID}"),
        (["rules", "check", "--nosuch"], "rules check [OPTIONS] [DIR]"),
        (["rules", "test", "--nosuch"], "rules test [OPTIONS] [PREDICTION]"),
    ],
)
def test_usage_names_arguments_as_the_readme_does(args: list[str], usage: str) -> None:
    """Typer brackets an optional argument itself: a metavar of "[ALERT_ID]" read `[[ALERT_ID]]`; and an
    argument without one was shown by its parameter name, `{file}`, where the README says FILE."""
    result = CliRunner().invoke(cli.app, args, prog_name="decision-router")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == f"Usage: decision-router {usage}"


def test_no_command_prints_the_help_and_no_error_line() -> None:
    result = invoke("rules")
    assert result.exit_code == 2 and "Usage: " in result.stdout and result.stderr == ""


# demo and simulate: bounded sizes, and their --database / --redis checked as the variables are ----------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["demo", "--predictions", "0"], "--predictions"),
        (["demo", "--predictions", "-1"], "--predictions"),
        (["demo", "--predictions", "99999999999999999999"], "--predictions"),
        (["simulate", "--entities", "99999999999999999999"], "--entities"),
        (["simulate", "--days", "100000"], "--days"),
        (["simulate", "--days", "99999999999999999999"], "--days"),
        (["simulate", "--drift-from-day", "-1"], "--drift-from-day"),
    ],
)
def test_simulation_sizes_out_of_bounds_are_usage_errors(args: list[str], option: str) -> None:
    result = invoke(*args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.exception
    assert f"Invalid value for '{option}'" in result.output


@pytest.mark.parametrize(
    ("args", "code", "shown"),
    [
        (["demo", "--database", "nonsense://"], 2, "error: --database: must be a sqlite:/// or postgresql"),
        (["demo", "--database", "sqlite:////nonexistent/x.db"], 1, "error: cannot open the store at sqlite:////"),
        (["simulate", "--database", "sqlite:////nonexistent/x.db"], 1, "error: cannot open the store at sqlite:////"),
        (["simulate", "--redis", "http://x"], 2, "error: --redis: must start with redis://"),
        (["simulate", "--redis", "redis://127.0.0.1:1/0"], 1, "error: cannot reach Redis at redis://127.0.0.1:1/0"),
    ],
)
def test_simulation_stores_that_do_not_open_are_one_line(args: list[str], code: int, shown: str) -> None:
    assert one_error(invoke(*args), code).startswith(shown)


# outcome, reassign: what the router's gate would dead-letter is refused, not "recorded" -----------------


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["outcome", "acknowledged", "--actor", "a", "--alert", ""], "reject it as schema: "),
        (["reassign", "", "--to", "alice-moreau", "--by", "me"], "reject it as schema: "),
        (["outcome", "acknowledged", "--actor", "a", "--alert", "al-1", "--note", "x" * 70_000], "as too_large: "),
        (["outcome", "acknowledged", "--actor", "a", "--alert", "al-1", "--owner", "bob"],
         "--owner is only allowed with TYPE reassigned"),  # the contract's rule, as the router applies it, in CLI words
        (["outcome", "acknowledged", "--actor", "a", "--alert", "al-1", "--at", "last tuesday"], "--at: "),
        (["outcome", "intervened", "--actor", "a", "--alert", "al-1", "--at", "2999-01-01"], "as from_future: at is "),
    ],
)
def test_an_outcome_the_router_would_reject_is_refused(
    args: list[str], shown: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing is written, whatever happens
    assert shown in one_error(invoke(*args), 2)


def test_an_outcome_says_when_it_happened_with_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """A business system reporting an outcome days later gives its time: without --at the router took the
    moment it processed the event, and times to act and outcome windows counted from then."""
    from decision_router import cli_common, publisher

    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:1/0")
    sent: list = []

    class Client:
        async def aclose(self) -> None:
            return None

    async def connect(_settings: object) -> Client:
        return Client()

    async def publish(_redis: object, _stream: str, event: object) -> str:
        sent.append(event)
        return "1-0"

    monkeypatch.setattr(cli_common, "_connect", connect)
    monkeypatch.setattr(publisher, "publish_outcome", publish)
    result = invoke("outcome", "outcome", "--actor", "crm", "--alert", "al-1", "--result", "success",
                    "--at", "2026-11-20T14:05")
    assert result.exit_code == 0, result.output
    (event,) = sent
    assert event.at == datetime(2026, 11, 20, 14, 5, tzinfo=UTC)  # no offset: UTC
    assert json.loads(publisher.outcome_fields(event)["data"])["at"].startswith("2026-11-20T14:05:00")


# Text that is not valid UTF-8 (bytes a shell passes through) is refused, naming the option ---------------


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["audit", "al-\udcff"], "ALERT_ID"),
        (["audit", "--entity", "a:\udcff"], "--entity"),
        (["stats", "--owner", "a\udcff"], "--owner"),
        (["stats", "--rule", "a\udcff"], "--rule"),
        (["stats", "quality", "--model", "a\udcff"], "--model"),
        (["tokens", "create", "--role", "ops", "--name", "a\udcff"], "--name"),
        (["tokens", "revoke", "a\udcff"], "ID"),
        (["outcome", "acknowledged", "--actor", "a", "--alert", "x\udcff"], "--alert"),
        (["outcome", "acknowledged", "--actor", "a", "--alert", "x", "--note", "n\udcff"], "--note"),
        (["rules", "test", "--expect-rule", "ok", "--expect-rule", "r\udcff", "{}"], "--expect-rule"),
    ],
)
def test_text_that_is_not_utf8_is_refused(args: list[str], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing is written, whatever happens
    assert one_error(invoke(*args), 2) == f"error: {name}: not valid UTF-8"


def test_bytes_from_a_shell_and_the_environment_are_refused_too(tmp_path: Path) -> None:
    """As a user runs it: the argument and the variable are bytes (\\xff) that Python reads as surrogates."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    argument = subprocess.run(
        [sys.executable, "-m", "decision_router", b"audit", b"al-\xff"],
        env=env, cwd=tmp_path, capture_output=True, timeout=60, check=False,
    )
    assert (argument.returncode, argument.stderr) == (2, b"error: ALERT_ID: not valid UTF-8\n")
    prefix = subprocess.run(
        [sys.executable, "-m", "decision_router", "health"],
        env={**env, "DECISION_ROUTER_STREAM_PREFIX": os.fsdecode(b"p\xff:")},
        cwd=tmp_path, capture_output=True, timeout=60, check=False,
    )
    assert (prefix.returncode, prefix.stderr) == (2, b"error: DECISION_ROUTER_STREAM_PREFIX: not valid UTF-8\n")


def test_rules_test_names_a_byte_that_is_not_utf8_in_a_file_or_on_stdin(tmp_path: Path) -> None:
    """As `publish` names it, not as the lone surrogate it was as text (nor a UnicodeDecodeError from stdin)."""
    raw = b'{"prediction_id": "p\xff"}\n'
    (tmp_path / "p.jsonl").write_bytes(raw)
    for args, source in ((["rules", "test", "--file", "p.jsonl"], "p.jsonl"), (["rules", "test"], "stdin")):
        result = CliRunner().invoke(cli.app, args, input=raw)
        assert one_error(result, 2) == (
            f"error: {source}: invalid prediction: invalid_encoding: field data is not valid UTF-8 (byte 20)")


@pytest.mark.parametrize("command", [["stats"], ["stats", "quality"], ["stats", "model"],
                                     ["rules", "replay", "--rules", str(SHIPPED_RULES)]])
def test_an_inverted_window_is_an_error_not_an_empty_report(command: list[str]) -> None:
    # --since 1d --until 7d: "since yesterday, until a week ago" holds nothing; say so rather than print nothing.
    line = one_error(invoke(*command, "--since", "1d", "--until", "7d"), 2)
    assert line == "error: --until (7d) must be after --since (1d)"


@pytest.mark.parametrize(
    "command",
    [["stats"], ["stats", "quality"], ["stats", "model"], ["rules", "replay", "--rules", str(ROOT / "rules")]],
)
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_duration_too_large_says_so_not_that_a_duration_was_expected(command: list[str], option: str) -> None:
    line = one_error(invoke(*command, option, "99999999999d"), 2)
    assert re.fullmatch(
        rf"error: {option}: duration '99999999999d' is too large: the maximum is \d+d, back to the year 1", line)


@pytest.mark.parametrize(
    "command",
    [["stats"], ["stats", "quality"], ["stats", "model"], ["rules", "replay", "--rules", str(ROOT / "rules")]],
)
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_bad_since_or_until_names_the_option(command: list[str], option: str) -> None:
    """As the other options' errors do (`--bands: ...`): with both given, which one was wrong."""
    other = "--until" if option == "--since" else "--since"
    line = one_error(invoke(*command, other, "2026-01-01", option, "yesterday"), 2)
    assert line == f"error: {option}: expected a duration like 7d or an ISO date like 2026-11-01, not 'yesterday'"
    line = one_error(invoke(*command, option, "9999-99-99"), 2)
    assert line.startswith(f"error: {option}: "), line


def test_a_number_of_hundreds_of_digits_is_quoted_by_its_start_and_length() -> None:
    line = one_error(invoke("stats", "model", "--bands", "9" * 400), 2)
    assert line == ("error: --bands: expected at least two strictly increasing finite numbers, "
                    "not '99999999999999999999… (400 digits)'")


# reassign: an owner who is away ------------------------------------------------------------------------


def publishing_to(sent: list[dict]) -> Callable[..., None]:
    """send_outcome without Redis: the command's own checks run (before_publishing), then `sent` gets the event."""

    def send(document: dict, settings: object, *, before_publishing: Callable[[], None] | None = None,
             **_options: object) -> None:
        if before_publishing is not None:
            before_publishing()
        sent.append(document)

    return send


def test_reassigning_to_an_away_owner_says_who_receives_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "routing.yaml").write_text("rules:\n  - {name: rest, when: {}, owner: desk, action: record}\n")
    (rules / "owners.yaml").write_text(
        "owners:\n  - {id: desk, name: Desk}\n"
        "  - {id: hugo, name: Hugo, away_until: '2999-01-01', delegate: felix}\n  - {id: felix, name: Felix}\n"
    )
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(rules))
    sent: list[dict] = []
    monkeypatch.setattr("decision_router.cli_governance.send_outcome", publishing_to(sent))
    result = invoke("reassign", "al-1", "--to", "hugo", "--by", "lead")
    assert result.exit_code == 0, result.output
    assert result.stderr == "note: 'hugo' is away; the router gives the alert to their delegate 'felix'\n"
    # The event names the owner asked for: the router resolves the delegate when it applies it.
    assert [d["owner"] for d in sent] == ["hugo"]
    assert invoke("reassign", "al-1", "--to", "felix", "--by", "lead").stderr == ""


def test_reassigning_to_the_owner_holding_the_alert_or_a_closed_one_says_what_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router records such a request and changes nothing (or, closed, sends nothing): the user expected a
    hand-over. What the store says now is noted; the event is published all the same."""
    from sqlmodel import Session

    from decision_router.store import create_schema, make_engine
    from tests.unit.test_stats import alert

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "routing.yaml").write_text("rules:\n  - {name: rest, when: {}, owner: desk, action: record}\n")
    (rules / "owners.yaml").write_text(
        "owners:\n  - {id: desk, name: Desk}\n"
        "  - {id: hugo, name: Hugo, away_until: '2999-01-01', delegate: felix}\n  - {id: felix, name: Felix}\n"
    )
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    create_schema(engine)
    with Session(engine) as session:
        session.add_all([alert(0, rule="r", owner="felix"), alert(1, rule="r", owner="felix", outcome="success")])
        session.commit()
    engine.dispose()
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(rules))
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", url)
    sent: list[dict] = []
    monkeypatch.setattr("decision_router.cli_governance.send_outcome", publishing_to(sent))
    held = "note: 'felix' already holds the alert; nothing changes\n"
    assert invoke("reassign", "al-r-0", "--to", "felix", "--by", "lead").stderr == held
    assert invoke("reassign", "al-r-0", "--to", "hugo", "--by", "lead").stderr == (
        "note: 'hugo' is away; the router gives the alert to their delegate 'felix'\n" + held
    )
    assert invoke("reassign", "al-r-1", "--to", "desk", "--by", "lead").stderr == (
        "note: the alert is closed; 'desk' becomes accountable for it, and does not receive it\n"
    )
    assert invoke("reassign", "al-r-0", "--to", "desk", "--by", "lead").stderr == ""  # a hand-over
    # No such alert in the store: refused, not "recorded" for the router to dead-letter (unknown_alert).
    line = one_error(invoke("reassign", "al-nope", "--to", "desk", "--by", "lead"), 2)
    assert line == f"error: no alert 'al-nope' in the store at {url}; nothing was sent"
    assert [d["owner"] for d in sent] == ["felix", "hugo", "desk", "desk"]
    # No store where the URL points: nothing to say, and none created by looking.
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert invoke("reassign", "al-r-0", "--to", "felix", "--by", "lead").stderr == ""
    assert not (tmp_path / "elsewhere.db").exists()


def closed_alert_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, datetime]:
    """A store holding al-r-1, created at T0 and closed (its outcome) an hour later; the CLI's settings point at it.
    Returns its URL and the outcome's time."""
    from sqlmodel import Session

    from decision_router.store import create_schema, make_engine
    from tests.unit.test_stats import T0, alert

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    create_schema(engine)
    outcome_at = T0 + timedelta(hours=1)
    record = alert(1, rule="r", owner="felix", outcome="success")
    record.outcome_at = outcome_at
    with Session(engine) as session:
        session.add(record)
        session.commit()
    engine.dispose()
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", url)
    return url, outcome_at


@pytest.mark.parametrize("type_", ["acknowledged", "intervened", "outcome", "reassigned"])
def test_outcome_for_an_alert_id_the_store_lacks_is_refused_as_reassign_refuses_it(
    type_: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`outcome TYPE --alert al-nope` published an event the router dead-letters (unknown_alert), said "recorded"."""
    url, _ = closed_alert_store(tmp_path, monkeypatch)
    sent: list[dict] = []
    monkeypatch.setattr("decision_router.cli.send_outcome", publishing_to(sent))
    extra = {"outcome": ["--result", "success"], "reassigned": ["--owner", "desk"]}.get(type_, [])
    line = one_error(invoke("outcome", type_, "--alert", "al-nope", "--actor", "ops", *extra), 2)
    assert line == f"error: no alert 'al-nope' in the store at {url}; nothing was sent"
    assert sent == []
    # By prediction or entity it addresses a set the router looks up: published.
    assert invoke("outcome", type_, "--prediction", "p-nope", "--actor", "ops", *extra).exit_code == 0
    assert len(sent) == 1


def test_outcome_ack_or_intervention_after_the_alerts_outcome_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router refuses it (it cannot have caused the outcome): an error here, not "recorded"."""
    _, outcome_at = closed_alert_store(tmp_path, monkeypatch)
    sent: list[dict] = []
    monkeypatch.setattr("decision_router.cli.send_outcome", publishing_to(sent))
    after = (outcome_at + timedelta(minutes=5)).isoformat()
    line = one_error(invoke("outcome", "intervened", "--alert", "al-r-1", "--actor", "felix", "--at", after), 2)
    assert line == ("error: alert 'al-r-1' has its outcome since 2026-11-01T10:00:00Z: intervened --at "
                    "2026-11-01T10:05:00Z is after it, and the router would refuse it; nothing was sent")
    line = one_error(invoke("outcome", "acknowledged", "--alert", "al-r-1", "--actor", "felix"), 2)
    assert line.startswith("error: alert 'al-r-1' has its outcome since 2026-11-01T10:00:00Z: acknowledged now (")
    assert line.endswith("; give --at if it was earlier) is after it, and the router would refuse it; nothing was sent")
    assert sent == []
    # Dated before the outcome (reported late): sent.
    before = (outcome_at - timedelta(minutes=5)).isoformat()
    result = invoke("outcome", "intervened", "--alert", "al-r-1", "--actor", "felix", "--at", before)
    assert result.exit_code == 0, result.output
    assert [d["at"] for d in sent] == [before]


def test_outcome_dated_before_the_alert_existed_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`outcome intervened --alert ID --at T` with T before the alert was created said "recorded", and the router
    then dead-lettered it (schema): the README says an `at` the router would refuse is refused here, exit 2."""
    from sqlmodel import Session

    from decision_router.store import create_schema, make_engine
    from tests.unit.test_stats import T0, alert

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    create_schema(engine)
    record = alert(1, rule="r", owner="felix")  # open, created at T0 (09:00)
    record.predicted_at = T0 - timedelta(hours=1)
    with Session(engine) as session:
        session.add(record)
        session.commit()
    engine.dispose()
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", url)
    sent: list[dict] = []
    monkeypatch.setattr("decision_router.cli.send_outcome", publishing_to(sent))

    def at(minutes: int) -> str:
        return (T0 + timedelta(minutes=minutes)).isoformat()

    line = one_error(invoke("outcome", "intervened", "--alert", "al-r-1", "--actor", "felix", "--at", at(-10)), 2)
    assert line == ("error: alert 'al-r-1' was created at 2026-11-01T09:00:00Z: intervened --at 2026-11-01T08:50:00Z "
                    "is before it, and the router would refuse it; nothing was sent")
    # An outcome may come before the alert, not before its prediction.
    line = one_error(invoke("outcome", "outcome", "--alert", "al-r-1", "--actor", "crm", "--result", "failure",
                            "--at", at(-70)), 2)
    assert line == ("error: alert 'al-r-1' was predicted at 2026-11-01T08:00:00Z: outcome --at 2026-11-01T07:50:00Z "
                    "is before it, and the router would refuse it; nothing was sent")
    assert sent == []
    # Within the clock skew (5m) of its creation, and an outcome after the prediction: sent, as the router takes them.
    for args in (["acknowledged", "--at", at(-4)], ["outcome", "--result", "failure", "--at", at(-30)]):
        result = invoke("outcome", *args, "--alert", "al-r-1", "--actor", "felix")
        assert result.exit_code == 0, result.output
    assert [d["at"] for d in sent] == [at(-4), at(-30)]


def test_rules_test_with_stdin_closed_says_where_to_give_the_prediction(tmp_path: Path) -> None:
    """`decision-router rules test <&-`: Python then has no sys.stdin (None), which was an AttributeError."""
    env = {**os.environ, "DECISION_ROUTER_RULES_DIR": str(SHIPPED_RULES)}
    done = subprocess.run(
        f"{sys.executable} -m decision_router rules test <&-", shell=True, executable="/bin/bash",
        env=env, cwd=tmp_path, capture_output=True, timeout=60, check=False,
    )
    assert (done.returncode, done.stderr) == (
        2, b"error: no stdin to read the prediction from: give it as an argument, with --file, or on a pipe\n")


def no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """`health` pings Redis first: nothing to ping in a unit test."""

    async def connect(_settings: object) -> object:
        class Closed:
            async def aclose(self) -> None:
                return None

        return Closed()

    monkeypatch.setattr(cli, "_connect", connect)


@pytest.mark.parametrize("command", [["redrive", "deliveries"], ["api", "--port", "0"], ["health"]])
def test_a_store_file_that_is_not_sqlite_is_one_error_line(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # They created the schema (or ran `select 1`) unguarded: a DatabaseError traceback, or only its class name.
    (tmp_path / "store.db").write_bytes(b"not an SQLite database, but a text file\n" * 50)
    no_redis(monkeypatch)
    line = one_error(invoke(*command), 1)
    assert line == f"error: cannot open the store at sqlite:///{tmp_path / 'store.db'}: file is not a database"


@pytest.mark.parametrize("command", [["stats"], ["stats", "drift"], ["audit", "a-1"], ["health"]])
def test_a_postgresql_that_refuses_the_connection_is_one_error_line(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq puts its hint on a line of its own ("\n\tIs the server running on that host ..."): two lines.
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/test")
    no_redis(monkeypatch)
    line = one_error(invoke(*command), 1)
    assert re.fullmatch(r"error: cannot (open|read) the store at postgresql\+psycopg://postgres@127\.0\.0\.1:1/test: "
                        r".*Connection refused; Is the server running on that host and accepting TCP/IP connections\?",
                        line), line


def test_tokens_on_a_read_only_store_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A read-only store opens and reads; only the write failed, with an OperationalError traceback.
    # (Read-only as SQLite's mode=ro: a file's mode bits do not stop root, who may run the tests.)
    created = invoke("tokens", "create", "--role", "ops")
    assert created.exit_code == 0, created.output
    token_id = created.stderr.split()[2]
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"sqlite:///file:{tmp_path / 'store.db'}?mode=ro&uri=true")
    refused = f"error: cannot write to the store at sqlite:///file:{tmp_path / 'store.db'}?mode=ro&uri=true: " \
              "attempt to write a readonly database"
    assert one_error(invoke("tokens", "create", "--role", "ops"), 1) == refused
    assert one_error(invoke("tokens", "revoke", token_id), 1) == refused


def test_serve_on_a_read_only_store_is_refused_at_start(tmp_path: Path) -> None:
    """It started, and every batch's writes failed: waited out as an outage, the entries left pending, for
    as long as it ran. A subprocess with a timeout: in-process, the old behaviour would not return."""
    store = tmp_path / "store.db"
    assert invoke("tokens", "list").exit_code == 0  # the store, with its schema
    url = f"sqlite:///file:{store}?mode=ro&uri=true"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env.update(DECISION_ROUTER_DATABASE_URL=url, DECISION_ROUTER_RULES_DIR=str(ROOT / "rules"))
    done = subprocess.run([sys.executable, "-m", "decision_router", "serve", "--no-api"],
                          env=env, cwd=tmp_path, capture_output=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr.decode()
    assert done.stderr.decode().splitlines()[-1] == (
        f"error: cannot open the store at {url}: attempt to write a readonly database")


@pytest.mark.parametrize(("command", "option"), [
    (["stats"], "DECISION_ROUTER_DATABASE_URL"),
    (["demo", "--predictions", "10", "--database"], "--database"),
])
def test_an_sqlite_url_option_sqlite_would_ignore_is_one_error_line(command: list[str], option: str,
                                                                    tmp_path: Path) -> None:
    """SQLite takes mode=... only with uri=true and a file: name: SQLAlchemy printed its SAWarning, ignored the
    option and went on (stats exit 0, the demo ran and wrote). A subprocess: the warning is stderr text there."""
    url = f"sqlite:///{tmp_path / 'store.db'}?mode=bogus"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    if option.startswith("DECISION_ROUTER_"):
        env[option] = url
    else:
        command = [*command, url]
    done = subprocess.run([sys.executable, "-m", "decision_router", *command], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (
        2, f"error: {option}: the SQLite URL option mode must be ro, rw, rwc or memory, not 'bogus': {url}\n")


@pytest.mark.parametrize("command", [["simulate", "--entities", "10", "--days", "1"], ["demo", "--predictions", "10"]])
def test_simulating_into_a_read_only_store_is_refused_at_start(command: list[str], tmp_path: Path) -> None:
    """It opened and read, and every write failed: the run waited them out as an outage, until Ctrl-C.
    A subprocess with a timeout: in-process, the old behaviour would hang the test run."""
    store = tmp_path / "store.db"
    assert invoke("tokens", "list").exit_code == 0  # the store, with its schema
    url = f"sqlite:///file:{store}?mode=ro&uri=true"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    done = subprocess.run(
        [sys.executable, "-m", "decision_router", *command, "--database", url],
        env=env, cwd=tmp_path, capture_output=True, timeout=60, check=False,
    )
    assert (done.returncode, done.stderr.decode()) == (
        1, f"error: cannot open the store at {url}: attempt to write a readonly database\n")


def test_reassign_asks_a_postgresql_that_never_answers_only_briefly(silent_server: int, monkeypatch) -> None:
    """Its notes read the store; a PostgreSQL that accepts and never answers held `reassign` for the store's
    10 s connect timeout before it published. The note is not worth that: 2 s, then publish (here: no Redis)."""
    import time

    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"postgresql+psycopg://u@127.0.0.1:{silent_server}/x")
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    started = time.monotonic()
    line = one_error(invoke("reassign", "al-1", "--to", "alice-moreau", "--by", "me"), 1)
    assert line.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0"), line
    assert time.monotonic() - started < 8
