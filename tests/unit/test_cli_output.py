"""What the CLI leaves behind and what it prints besides its tables: a command that reads the store never
creates one, `--version`, times in JSON written as the API and the streams write them (UTC, `Z`), and the
rules read once per command. The CLI in-process (typer's CliRunner) in a temporary directory, on the
shipped rules."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from decision_router import cli, rules
from tests.unit.test_cli_input import invoke, one_error
from tests.unit.test_cli_messages import month_old_churn_alert, unseen

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_RULES = ROOT / "rules"


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No DECISION_ROUTER_DATABASE_URL: the store is the default, decision_router.db in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(SHIPPED_RULES))
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing is ever sent
    return tmp_path


@pytest.fixture
def redis_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`health` pings Redis before it looks at the store: here Redis always answers."""

    class Answering:
        async def aclose(self) -> None:
            return None

    async def connect(settings: Any) -> Answering:
        return Answering()

    monkeypatch.setattr(cli, "_connect", connect)


def no_store_error(workdir: Path) -> str:
    return (f"error: no store at sqlite:///decision_router.db ({workdir / 'decision_router.db'}): no such file "
            "(`serve` creates it in its working directory: run this there, or set DECISION_ROUTER_DATABASE_URL)")


# Commands that read or change the store never create it ---------------------------------------------


@pytest.mark.usefixtures("redis_answers")
@pytest.mark.parametrize(
    "command",
    [["health"], ["tokens", "list"], ["tokens", "list", "--format", "json"], ["tokens", "revoke", "tok-1"],
     ["redrive", "deliveries"]],
    ids=lambda c: " ".join(c),
)
def test_commands_on_the_store_outside_the_serve_directory_say_there_is_none(command: list[str], tmp_path: Path) -> None:
    """They created an empty decision_router.db where they ran: `health` then said "ok", `tokens list`
    listed no tokens, of a router whose store is in the directory `serve` runs in."""
    assert one_error(invoke(*command), 1) == no_store_error(tmp_path)
    assert not list(tmp_path.glob("decision_router.db*"))


@pytest.mark.usefixtures("redis_answers")
@pytest.mark.parametrize("url", ["sqlite:///file:elsewhere.db?uri=true", "sqlite:///file:elsewhere.db?mode=rw&uri=true",
                                 "sqlite:///elsewhere.db?uri=false", "sqlite:///file://{dir}/elsewhere.db?uri=true"])
def test_a_store_named_by_an_sqlite_uri_is_looked_for_too(url: str, tmp_path: Path, monkeypatch) -> None:
    """A `uri` option, true or false, skipped the check: `health` then created the file (or said it could
    not open it) instead of saying there is no store."""
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", url.format(dir=tmp_path))
    error = one_error(invoke("health"), 1)
    assert error.startswith("error: no store at sqlite:///") and "elsewhere.db" in error, error
    assert not list(tmp_path.glob("*elsewhere.db*"))


@pytest.mark.usefixtures("redis_answers")
def test_the_commands_that_make_a_store_still_do_and_the_others_then_read_it(tmp_path: Path) -> None:
    created = invoke("tokens", "create", "--role", "ops", "--name", "grafana")
    assert created.exit_code == 0, created.output
    assert (tmp_path / "decision_router.db").is_file()
    listed = invoke("tokens", "list", "--format", "json")
    assert listed.exit_code == 0, listed.output
    assert [t["name"] for t in json.loads(listed.stdout)] == ["grafana"]
    healthy = invoke("health")
    assert (healthy.exit_code, healthy.stdout) == (0, "ok\n")


# --version ------------------------------------------------------------------------------------------


def test_version_prints_the_installed_version() -> None:
    shown = invoke("--version")
    assert (shown.exit_code, shown.stdout, shown.stderr) == (0, f"decision-router {version('decision-router')}\n", "")


def test_version_as_a_user_runs_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "decision_router", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"decision-router {version('decision-router')}\n", "")


# Times in JSON end in Z -------------------------------------------------------------------------------


def utc_z(value: str) -> datetime:
    """`value`, which must be UTC written with a Z as the API writes it, as a datetime."""
    assert value.endswith("Z") and "+00:00" not in value, value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


def test_tokens_list_writes_its_times_with_a_z() -> None:
    created = invoke("tokens", "create", "--role", "ops")
    assert created.exit_code == 0, created.output
    (token,) = json.loads(invoke("tokens", "list", "--format", "json").stdout)
    assert token["revoked_at"] is None
    utc_z(token["created_at"])
    assert invoke("tokens", "revoke", token["id"]).exit_code == 0
    (token,) = json.loads(invoke("tokens", "list", "--format", "json").stdout)
    assert utc_z(token["revoked_at"]) >= utc_z(token["created_at"])


def test_tokens_list_marks_an_owner_token_whose_owner_left_the_directory(tmp_path: Path, monkeypatch) -> None:
    """The API refuses a leaver's token; `tokens list` showed it like any other, so nobody knew to revoke it."""
    with_hire = tmp_path / "rules"
    with_hire.mkdir()
    (with_hire / "routing.yaml").write_text((SHIPPED_RULES / "routing.yaml").read_text())
    (with_hire / "owners.yaml").write_text((SHIPPED_RULES / "owners.yaml").read_text()
                                           + "  - {id: new-hire, name: New Hire, channels: [inbox]}\n")
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(with_hire))
    for owner in ("new-hire", "alice-moreau"):
        assert invoke("tokens", "create", "--role", "owner", "--owner", owner).exit_code == 0
    assert invoke("tokens", "create", "--role", "ops").exit_code == 0
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(SHIPPED_RULES))  # new-hire has left
    listed = json.loads(invoke("tokens", "list", "--format", "json").stdout)
    assert [(t["owner"], t["owner_gone"]) for t in listed] == [("new-hire", True), ("alice-moreau", False), (None, None)]
    table = invoke("tokens", "list")
    assert table.exit_code == 0, table.output
    assert "new-hire (owner gone)" in table.stdout and "alice-moreau (owner gone)" not in table.stdout
    assert table.stderr.startswith("owner gone: new-hire no longer in ")
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(with_hire))  # back: nothing to mark
    table = invoke("tokens", "list")
    assert "owner gone" not in table.stdout and table.stderr == ""


def test_rules_test_writes_its_times_with_a_z() -> None:
    prediction = {
        "prediction_id": "p1", "model": "churn", "model_version": "2026.11", "entity_type": "account",
        "entity_id": "acct-1", "score": 0.92, "predicted_at": datetime.now(UTC).isoformat(),
        "context": {"segment": "strategic", "account_manager": "benoit-garnier", "arr": 650000},
    }
    tested = invoke("rules", "test", "--format", "json", json.dumps(prediction))
    assert tested.exit_code == 0, tested.output
    document = json.loads(tested.stdout)
    now = utc_z(document["now"])
    (matches,) = [p["matches"] for p in document["predictions"]]
    assert matches
    for match in matches:
        assert utc_z(match["ack_by"]) > now and utc_z(match["act_by"]) > now


def test_rules_replay_writes_its_window_with_a_z(tmp_path: Path) -> None:
    (tmp_path / "decision_router.db").touch()  # a store with nothing in it yet
    replayed = invoke("rules", "replay", "--rules", str(SHIPPED_RULES), "--since", "7d", "--until", "1d",
                      "--format", "json")
    assert replayed.exit_code == 0, replayed.output
    document = json.loads(replayed.stdout)
    window = utc_z(document["until"]) - utc_z(document["since"])
    assert abs(window - timedelta(days=6)) < timedelta(seconds=5)  # each of 7d and 1d is read against its own now


def test_a_simulated_days_time_is_written_with_a_z() -> None:
    from decision_router.simulate import DayReading, SimulationParams, SimulationResult, Tally, Truth

    result = SimulationResult(
        params=SimulationParams(), truth=Truth(0.1, 0.5, 0.05, 0.3, 0.35, 0.2), tally=Tally(*[0] * 12), owners=[],
        alerts=[], outcomes=[], measured=None, measured_by_owner=[],
        days=[DayReading(0, datetime(2026, 11, 2, tzinfo=UTC), None, ())], rejected={},
        drift_detected_day=None, flagged_days=[], drift_checked=False, database_url=None, stream_prefix="sim:",
        elapsed_s=0.0,
    )
    (day,) = json.loads(json.dumps(result.as_dict(), default=str))["days"]  # as `simulate --format json` writes it
    assert day["at"] == "2026-11-02T00:00:00Z"


# The rules are read once per command ------------------------------------------------------------------


@pytest.fixture
def rules_loads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many times the rules were loaded (from decision_router.rules, where every command imports them)."""
    calls = 0
    load = rules.load_rules

    def counted(rules_dir: Any) -> Any:
        nonlocal calls
        calls += 1
        return load(rules_dir)

    monkeypatch.setattr(rules, "load_rules", counted)
    return lambda: calls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rule", "smb-churn-risk", "--model", "chrun"], unseen("chrun") + "; did you mean 'churn'?"),
        (["--owner", "alcie-moreau"], f"--owner: owner 'alcie-moreau' is not in the owner directory ({SHIPPED_RULES}), "
                                      "and the store has no alerts for it; did you mean 'alice-moreau'?"),
    ],
)
def test_stats_on_an_empty_result_reads_the_rules_once(
    args: list[str], message: str, rules_loads: Callable[[], int], tmp_path: Path
) -> None:
    """The holdouts, the --rule/--owner check and the --model check each loaded them: up to 3 times."""
    month_old_churn_alert(tmp_path)
    (tmp_path / "store.db").rename(tmp_path / "decision_router.db")
    assert one_error(invoke("stats", *args), 2) == f"error: {message}"
    assert rules_loads() == 1


def test_stats_drift_for_a_model_no_one_knows_reads_the_rules_once(rules_loads: Callable[[], int], tmp_path: Path) -> None:
    """Its drift settings and the --model check each loaded them."""
    month_old_churn_alert(tmp_path)
    (tmp_path / "store.db").rename(tmp_path / "decision_router.db")
    assert one_error(invoke("stats", "drift", "--model", "chrun"), 2) == f"error: {unseen('chrun')}; did you mean 'churn'?"
    assert rules_loads() == 1
