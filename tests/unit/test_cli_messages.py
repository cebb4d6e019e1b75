"""What the CLI says, as a user reads it and a script greps it: whole lines, counts with the right noun, the
close match of a mistyped name, its own option names. The CLI in-process (typer's CliRunner), on a SQLite store
in a temporary directory and the shipped rules."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import Result

from decision_router.rules import load_rules
from decision_router.store import create_schema, make_engine
from tests.unit.test_cli_input import invoke
from tests.unit.test_cli_input import one_error as error_line
from tests.unit.test_stats import alert

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_RULES = ROOT / "rules"


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    (tmp_path / "store.db").touch()  # an SQLite store with no tables yet (a missing file is refused)
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(SHIPPED_RULES))
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing is ever sent
    monkeypatch.setenv("COLUMNS", "80")  # the width Rich assumes when output is not a terminal
    return tmp_path


def one_error(result: Result, code: int) -> str:
    return error_line(result, code).removeprefix("error: ")


def small_rules(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "routing.yaml").write_text("rules:\n  - {name: all, when: {}, owner: desk}\n")
    (directory / "owners.yaml").write_text("owners:\n  - {id: desk, name: Desk}\n")
    return directory


# Messages to a file or pipe are never wrapped ------------------------------------------------------


def test_a_message_on_stderr_is_one_line_however_long() -> None:
    created = invoke("tokens", "create", "--role", "owner", "--owner", "alice-moreau")
    assert created.exit_code == 0, created.output
    (line,) = created.stderr.splitlines()
    assert line.startswith("created token ")
    assert line.endswith(" (role owner, owner alice-moreau); it is shown only now:")
    assert len(line) > 80


def test_a_message_on_stdout_is_one_line_however_long(tmp_path: Path) -> None:
    directory = small_rules(tmp_path / ("long-" * 40 + "rules"))
    checked = invoke("rules", "check", str(directory))
    assert checked.exit_code == 0, checked.output
    assert checked.stdout == f"{directory}: ok — 1 rule, 1 owner, version {load_rules(directory).version}\n"


# A name that is not known: did you mean ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--owner", "alcie-moreau"], "--owner: owner 'alcie-moreau' is not in the owner directory ({rules}), and the "
                                      "store has no alerts for it; did you mean 'alice-moreau'?"),
        (["--rule", "smb-churn-rsk"], "--rule: rule 'smb-churn-rsk' is not in the rules ({rules}), and the store has "
                                      "no alerts for it; did you mean 'smb-churn-risk'?"),
        (["--rule", "nope", "--format", "json"], "--rule: rule 'nope' is not in the rules ({rules}), and the store has "
                                                 "no alerts for it"),
    ],
)
def test_stats_for_a_rule_or_owner_no_one_knows_is_an_error_like_reassign(args: list[str], message: str) -> None:
    assert one_error(invoke("stats", *args), 2) == message.format(rules=SHIPPED_RULES)


def test_stats_for_a_retired_rule_or_owner_the_store_knows_is_no_error(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    month_ago = datetime.now(UTC) - timedelta(days=30)
    with Session(engine) as session:
        session.add(alert(1, rule="retired-rule", owner="gone-owner", created=month_ago))
        session.commit()
    engine.dispose()
    for args in (["--rule", "retired-rule"], ["--owner", "gone-owner"]):
        shown = invoke("stats", *args, "--since", "7d")  # none in the window, but the store has some
        assert shown.exit_code == 0, shown.output
        assert f"no alerts match {' '.join(args)} in this window" in shown.stdout and shown.stderr == ""
        assert json.loads(invoke("stats", *args, "--format", "json").stdout)[0]["routed"] == 1


def test_stats_for_a_rule_and_an_owner_with_no_alert_in_common_says_the_filters_not_the_window(
    tmp_path: Path,
) -> None:
    """Both known, with alerts in the window, none of them both: "no alerts in this window yet" blamed the window."""
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    with Session(engine) as session:
        session.add_all([alert(1, rule="churn-risk", owner="alice", created=datetime.now(UTC)),
                         alert(2, rule="upsell", owner="analytics desk", created=datetime.now(UTC))])
        session.commit()
    engine.dispose()
    shown = invoke("stats", "--rule", "churn-risk", "--owner", "analytics desk", "--since", "7d")
    assert shown.exit_code == 0, shown.output
    assert "no alerts match --rule churn-risk --owner 'analytics desk' in this window" in shown.stdout
    assert "yet" not in shown.stdout and shown.stderr == ""
    assert "no alerts in this window yet" in invoke("stats", "--since", "2030-01-01").stdout  # no filter: the window
    quality = invoke("stats", "quality", "--model", "churn", "--since", "2030-01-01")
    assert quality.exit_code == 0, quality.output
    assert "no predictions match --model churn in this window" in quality.stdout


def test_stats_model_with_nothing_for_the_model_names_the_filter(tmp_path: Path) -> None:
    """`stats model --model X` said "no control predictions in this window", as `stats` used to."""
    create_schema(engine := make_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    engine.dispose()
    shown = invoke("stats", "model", "--model", "churn", "--since", "2030-01-01")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[-1] == (
        "no control predictions match --model churn in this window: precision needs a rule with a holdout "
        "(README, Control groups)")
    unfiltered = invoke("stats", "model", "--since", "2030-01-01")
    assert unfiltered.stdout.splitlines()[-1].startswith("no control predictions in this window yet: ")


MODEL_COMMANDS = [["stats"], ["stats", "quality"], ["stats", "model"], ["stats", "drift"]]


def month_old_churn_alert(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    with Session(engine) as session:
        session.add(alert(1, rule="retired-rule", owner="gone-owner", model="churn",
                          created=datetime.now(UTC) - timedelta(days=30)))
        session.commit()
    engine.dispose()


def unseen(model: str) -> str:
    return (f"--model: the store has no prediction, decision or rejection of model '{model}', and the rules "
            f"({SHIPPED_RULES}) do not name it")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_stats_for_a_model_the_store_never_saw_is_an_error_with_the_close_one(
    command: list[str], tmp_path: Path
) -> None:
    month_old_churn_alert(tmp_path)
    assert one_error(invoke(*command, "--model", "chrun"), 2) == unseen("chrun") + "; did you mean 'churn'?"
    # The close one may come from the rules alone (no payment-fraud prediction in this store).
    assert one_error(invoke(*command, "--model", "payment-frad"), 2) == (
        unseen("payment-frad") + "; did you mean 'payment-fraud'?")
    assert one_error(invoke(*command, "--model", "weather"), 2) == unseen("weather")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_model_the_store_never_saw_with_rules_that_do_not_load_says_so_not_that_they_do_not_name_it(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    month_old_churn_alert(tmp_path)
    broken = tmp_path / "broken-rules"
    broken.mkdir()
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(broken))  # neither file: the rules do not load
    result = invoke(*command, "--model", "chrun")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (
        "error: --model: the store has no prediction, decision or rejection of model 'chrun', and the rules in "
        f"{broken} do not load; did you mean 'churn'?")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_stats_for_a_model_the_store_knows_with_nothing_in_the_window_is_no_error(
    command: list[str], tmp_path: Path
) -> None:
    month_old_churn_alert(tmp_path)
    window = [] if command == ["stats", "drift"] else ["--since", "7d"]  # drift: its own recent window
    shown = invoke(*command, "--model", "churn", *window)
    assert shown.exit_code == 0, shown.output
    assert shown.stderr == "" and shown.stdout


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_stats_for_a_model_the_rules_name_but_the_store_never_saw_is_no_error(
    command: list[str], tmp_path: Path
) -> None:
    # A model routed by the rules before its first prediction (a new one, a fresh store).
    assert "payment-fraud" in {m for r in load_rules(SHIPPED_RULES).rules if r.models for m in r.models}
    month_old_churn_alert(tmp_path)
    shown = invoke(*command, "--model", "payment-fraud")
    assert shown.exit_code == 0, shown.output
    assert shown.stderr == ""


def test_stats_drift_for_a_model_on_a_store_with_no_tables_yet_is_an_error() -> None:
    assert one_error(invoke("stats", "drift", "--model", "chrun"), 2) == unseen("chrun") + "; did you mean 'churn'?"
    assert invoke("stats", "drift", "--model", "churn").exit_code == 0  # named by the rules


def test_a_token_for_a_mistyped_owner_suggests_the_close_one() -> None:
    message = one_error(invoke("tokens", "create", "--role", "owner", "--owner", "alcie-moreau"), 2)
    assert message == "owner 'alcie-moreau' is not in the owner directory (owners.yaml); did you mean 'alice-moreau'?"


# outcome names its own options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acknowledged", "--actor", "a"], "address the event by exactly one of --alert, --prediction or --entity"),
        (["acknowledged", "--actor", "a", "--alert", "al-1", "--entity", "account:a1"],
         "address the event by exactly one of --alert, --prediction or --entity"),
        (["outcome", "--actor", "a", "--alert", "al-1"], "TYPE outcome needs --result success or failure"),
        (["acknowledged", "--actor", "a", "--alert", "al-1", "--result", "success"],
         "--result is only allowed with TYPE outcome"),
        (["reassigned", "--actor", "a", "--alert", "al-1"], "TYPE reassigned needs --owner: the new owner's id"),
        (["acknowledged", "--actor", "a", "--alert", "al-1", "--owner", "bob"],
         "--owner is only allowed with TYPE reassigned"),
        (["outcome", "--actor", "a", "--alert", "al-1", "--result", "maybe"],
         "--result: Input should be 'success' or 'failure'"),
        (["done", "--actor", "", "--alert", "al-1"],
         "TYPE: Input should be 'acknowledged', 'intervened', 'outcome' or 'reassigned'; "
         "--actor: String should have at least 1 character"),
        (["acknowledged", "--actor", "  ", "--alert", "al-1"], "--actor: blank (only whitespace)"),
        (["acknowledged", "--actor", "a", "--alert", " "], "--alert: blank (only whitespace)"),
        (["acknowledged", "--actor", "a", "--prediction", "\t"], "--prediction: blank (only whitespace)"),
        (["acknowledged", "--actor", "a", "--entity", " :a1"], "--entity: blank (only whitespace)"),
        (["acknowledged", "--actor", "a", "--entity", "account: "], "--entity: blank (only whitespace)"),
        (["reassigned", "--actor", "a", "--alert", "al-1", "--owner", " "], "--owner: blank (only whitespace)"),
    ],
)
def test_outcome_errors_name_the_commands_options_not_the_events_fields(args: list[str], message: str) -> None:
    assert one_error(invoke("outcome", *args), 2) == f"invalid outcome event: {message}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["al-1", "--to", "alice-moreau", "--by", " "], "--by: blank (only whitespace)"),
        (["al-1", "--to", "alice-moreau", "--by", ""], "--by: String should have at least 1 character"),
        ([" ", "--to", "alice-moreau", "--by", "lead"], "ALERT_ID: blank (only whitespace)"),
    ],
)
def test_reassign_errors_name_its_own_options_not_the_events_fields(args: list[str], message: str) -> None:
    """`--by " "` said "actor: ...": reassign has no --actor."""
    assert one_error(invoke("reassign", *args), 2) == f"invalid outcome event: {message}"


def test_reassign_to_no_owner_names_its_own_option_when_the_rules_do_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unchecked against the directory (the rules do not load), an empty --to reached the contract's rule, worded
    with `outcome`'s options (TYPE reassigned needs --owner)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "routing.yaml").write_text("rules: [")
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(broken))
    shown = invoke("reassign", "al-1", "--to", "", "--by", "lead")
    assert shown.exit_code == 2, shown.output
    assert shown.stderr.splitlines()[-1] == "error: invalid outcome event: --to needs the new owner's id"


# rules check and rules test --------------------------------------------------------------------------


def test_rules_check_of_the_routing_file_says_to_give_the_directory() -> None:
    checked = invoke("rules", "check", str(SHIPPED_RULES / "routing.yaml"))
    assert checked.exit_code == 1
    assert checked.stderr.splitlines() == [
        f"{SHIPPED_RULES / 'routing.yaml'}: is a file: give the rules directory ({SHIPPED_RULES})",
        f"1 problem in {SHIPPED_RULES / 'routing.yaml'}",
    ]


def test_a_missing_rules_directory_is_one_line_as_serve_says_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rules check` printed "not found" for each of the two files, where `serve` says there is no directory."""
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(missing))
    from_settings = (f"no rules directory at {missing} (DECISION_ROUTER_RULES_DIR, default: rules in the working "
                     "directory): run this in the checkout, or set DECISION_ROUTER_RULES_DIR")
    assert one_error(invoke("rules", "check"), 1) == from_settings
    assert one_error(invoke("rules", "test", "{}"), 1) == from_settings
    # Named on the command line: the variable has nothing to do with it.
    assert one_error(invoke("rules", "check", str(missing)), 1) == f"no rules directory at {missing}"
    assert one_error(invoke("rules", "test", "--rules", str(missing), "{}"), 1) == f"no rules directory at {missing}"


def test_rules_test_reads_a_csv_file_as_publish_does(tmp_path: Path) -> None:
    now = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    csv_file = tmp_path / "predictions.csv"
    csv_file.write_text(
        "prediction_id,model,model_version,entity_type,entity_id,score,predicted_at,context.segment,"
        "context.account_manager,context.arr\n"
        f"c1,churn,2026.11,account,acct-1,0.92,{now},strategic,benoit-garnier,650000\n"
        f"c2,churn,2026.11,account,acct-2,1.4,{now},smb,ana-silva,1000\n"
    )
    tested = invoke("rules", "test", "--file", str(csv_file), "--format", "json")
    assert tested.exit_code == 2  # a prediction the gate rejects, as for JSON lines
    document = json.loads(tested.stdout)
    assert [(p["source"], p.get("prediction_id"), [m["rule"] for m in p.get("matches", [])], p.get("rejection"))
            for p in document["predictions"]] == [
        (f"{csv_file}:2", "c1", ["key-account-churn-visibility", "enterprise-churn-risk"], None),
        (f"{csv_file}:3", None, [], {"reason": "score_out_of_range", "detail": "score 1.4 is outside 0..1"}),
    ]
    # The same prediction as JSON is routed the same way: the CSV's columns were read as publish reads them.
    as_json = invoke("rules", "test", "--format", "json", json.dumps({
        "prediction_id": "c1", "model": "churn", "model_version": "2026.11", "entity_type": "account",
        "entity_id": "acct-1", "score": 0.92, "predicted_at": now,
        "context": {"segment": "strategic", "account_manager": "benoit-garnier", "arr": 650000},
    }))
    def decisions(predictions: list[dict]) -> list[tuple[str, str, str]]:
        return [(m["rule"], m["owner"], m["owner_why"]) for m in predictions[0]["matches"]]

    assert decisions(json.loads(as_json.stdout)["predictions"]) == decisions(document["predictions"])


def test_rules_test_refuses_a_csv_without_a_header_as_publish_does(tmp_path: Path) -> None:
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("p1,churn,3,account,acct-1,0.9,2026-11-25T11:00:00Z\n")
    assert one_error(invoke("rules", "test", "--file", str(csv_file)), 2) == (
        f"{csv_file}: the CSV header (line 1) has no prediction_id column: "
        "'p1,churn,3,account,acct-1,0.9,2026-11-25T11:00:00Z'"
    )


@pytest.mark.parametrize(
    ("lookup", "detail"),
    [
        ({"": {"tier": "gold"}}, "lookup.: an empty source name, which no rule path can address"),
        ({"crm": {"": 1}}, "lookup.crm.: an empty field name, which no rule path can address"),
    ],
)
def test_rules_test_refuses_an_empty_name_in_its_lookup_as_the_gate_does_in_context(
    lookup: dict, detail: str
) -> None:
    prediction = {
        "prediction_id": "p1", "model": "churn", "model_version": "1", "entity_type": "account", "entity_id": "a1",
        "score": 0.9, "predicted_at": datetime.now(UTC).isoformat(), "context": {"segment": "smb"},
    }
    in_context = invoke("rules", "test", json.dumps({**prediction, "context": {"": 1}}))
    assert one_error(in_context, 2) == (
        "argument: invalid prediction: schema: context.: an empty name, which no rule path can address")
    in_lookup = invoke("rules", "test", json.dumps({**prediction, "lookup": lookup}))
    assert one_error(in_lookup, 2) == f"argument: invalid prediction: schema: {detail}"


@pytest.mark.parametrize("field", ["model", "model_version"])
def test_rules_test_refuses_a_blank_model_or_version_as_the_gate_does(field: str) -> None:
    prediction = {
        "prediction_id": "p1", "model": "churn", "model_version": "1", "entity_type": "account", "entity_id": "a1",
        "score": 0.9, "predicted_at": datetime.now(UTC).isoformat(), field: " ",
    }
    assert one_error(invoke("rules", "test", json.dumps(prediction)), 2) == (
        f"argument: invalid prediction: schema: {field}: blank (only whitespace)")


def test_rules_test_says_an_expected_rule_or_owner_is_in_the_rules_nowhere(tmp_path: Path) -> None:
    """`--expect-rule nope` read only "mismatch: expected rules nope; got all", as if the rules had changed."""
    directory = small_rules(tmp_path / "rules")
    prediction = json.dumps({
        "prediction_id": "p1", "model": "churn", "model_version": "1", "entity_type": "account", "entity_id": "a1",
        "score": 0.9, "predicted_at": datetime.now(UTC).isoformat(),
    })
    tested = invoke("rules", "test", "--rules", str(directory), "--expect-rule", "al,all",
                    "--expect-owner", "dsk", "--expect-owner", "nobody", prediction)
    assert tested.exit_code == 2, tested.output
    assert tested.stdout == ""
    assert tested.stderr.splitlines() == [
        f"error: --expect-rule: no rule is called 'al' in {directory}/; did you mean 'all'?",
        f"error: --expect-owner: 'dsk' is not in the owner directory ({directory}/); did you mean 'desk'?",
        f"error: --expect-owner: 'nobody' is not in the owner directory ({directory}/)",
    ]
    met = invoke("rules", "test", "--rules", str(directory), "--expect-rule", "all", "--expect-owner", "desk", prediction)
    assert met.exit_code == 0, met.output
    assert met.stderr.splitlines() == ["expectations met"]


def test_rules_test_header_names_the_rules_directory(tmp_path: Path) -> None:
    directory = small_rules(tmp_path / "rules")
    tested = invoke("rules", "test", "--rules", str(directory), '{"prediction_id": "p1"}')
    assert tested.stdout.splitlines()[0].startswith(
        f"rules in {directory}/ (version {load_rules(directory).version}), evaluated at "
    )


# Tables on a narrow terminal --------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 100])
def test_the_stats_table_on_a_narrow_terminal_shows_every_cell_whole(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rich squeezed a table wider than the terminal: at 80 columns the stats table's counts were blank, at
    100 cut ('1…'). It is now printed at its natural width (the terminal wraps its lines)."""
    from decision_router import cli_common, cli_stats
    from decision_router.stats import GroupBy, compute_stats
    from tests.unit.test_insights import memory_store
    from tests.unit.test_stats import known_records

    engine = memory_store(known_records())
    with Session(engine) as session:
        rows = compute_stats(session, by=GroupBy.RULE)
    engine.dispose()
    shown = io.StringIO()
    console = cli_common._Console(
        file=shown, width=width, force_terminal=True, color_system=None, markup=False, emoji=False
    )
    monkeypatch.setattr(cli_stats, "out", console)
    cli_stats.print_stats(rows, GroupBy.RULE, "table")
    table = shown.getvalue()
    assert "…" not in table
    for row in rows:
        (line,) = [line for line in table.splitlines() if line.startswith(f"│ {row.key} ")]
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        assert cells == [row.key, *(cell(row) for _column, _header, cell in cli_stats.TABLE_COLUMNS)]
