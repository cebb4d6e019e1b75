"""`stats`, `stats quality`, `stats model` from a user's seat: `python -m decision_router` on a
SQLite store holding the unit tests' known-answer fixtures, with a rules directory that
configures their holdouts."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pytest
from sqlmodel import Session

from decision_router.store import create_schema, make_engine
from tests.e2e.helpers import clean_env, run
from tests.unit.test_stats import HOLDOUTS, known_records
from tests.unit.test_stats_model import control_records
from tests.unit.test_stats_quality import quality_records


def routing_yaml() -> str:
    rules = [f"  - {{name: {name}, when: {{model: retention, score: {{gte: 0.99}}}}, owner: desk, holdout: {fraction}}}"
             for name, fraction in HOLDOUTS.items() if fraction]
    return "\n".join(["rules:", *rules, "  - {name: everything-else, when: {}, owner: desk, action: record}", ""])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with every stats fixture, and rules configuring their holdouts (HOLDOUTS)."""
    directory = tmp_path_factory.mktemp("stats")
    (directory / "rules").mkdir()
    (directory / "rules" / "routing.yaml").write_text(routing_yaml())
    (directory / "rules" / "owners.yaml").write_text("owners:\n  - {id: desk, name: Desk}\n")
    engine = make_engine(f"sqlite:///{directory / 'store.db'}")
    create_schema(engine)
    with Session(engine) as session:
        session.add_all([*known_records(), *quality_records(), *control_records()])
        session.commit()
    engine.dispose()
    return directory


@pytest.fixture(scope="module")
def env(workdir: Path) -> dict[str, str]:
    return clean_env(DECISION_ROUTER_DATABASE_URL=f"sqlite:///{workdir / 'store.db'}")


def ok(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    shown = run(args, env, cwd)
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr
    return shown


def line_of(text: str, key: str) -> str:
    (line,) = [ln for ln in text.splitlines() if f" {key} " in ln]
    return line


# stats -------------------------------------------------------------------------------------


def test_stats_json_has_uplift_and_sample_ratio_check(workdir, env) -> None:
    shown = ok(["stats", "--format", "json"], env, workdir)
    rows = {row["rule"]: row for row in json.loads(shown.stdout)}
    watch = rows["watch"]
    assert (watch["routed"], watch["held_out"], watch["treated_n"], watch["control_n"]) == (40, 40, 40, 40)
    assert watch["uplift"] == pytest.approx(0.10)
    assert (watch["uplift_ci_low"], watch["uplift_ci_high"]) == pytest.approx((-0.0775, 0.2714), abs=5e-5)
    assert watch["uplift_seq_low"] < watch["uplift_ci_low"]
    assert (watch["srm_expected_fraction"], watch["srm_mismatch"]) == (0.5, False)
    assert rows["skewed"]["srm_mismatch"] is True and rows["skewed"]["srm_p_value"] < 1e-9
    assert rows["slight"]["srm_mismatch"] is False
    assert rows["tiny"]["uplift"] is None and rows["tiny"]["control_success_rate"] == pytest.approx(3 / 9)
    assert rows["churn-high"]["srm_expected_fraction"] is None  # no holdout configured for it
    # machine output stays clean; the warning goes to stderr
    assert "SRM! skewed" in shown.stderr and "SRM! slight" not in shown.stderr


def test_stats_table_fits_160_columns_and_says_what_it_cannot_show(workdir, env) -> None:
    shown = ok(["stats"], env, workdir)
    out = shown.stdout
    assert max(len(line) for line in out.splitlines()) <= 160
    assert "+10.0 [-7.7, +27.1]" in line_of(out, "watch")
    assert "[-27.2, +47.2]" in line_of(out, "watch")  # the always-valid interval
    assert "not enough data" in line_of(out, "tiny")
    assert "no control group" in line_of(out, "fraud")
    assert "SRM!" in line_of(out, "skewed") and "SRM!" not in line_of(out, "balanced")
    assert " ok " in line_of(out, "balanced")
    warnings = [ln for ln in out.splitlines() if ln.startswith("SRM!")]
    assert len(warnings) == 1
    assert warnings[0].startswith("SRM! skewed: control share 40.0% of 1000 decisions, configured holdout 50%")
    assert "uplift cannot be trusted" in warnings[0]
    assert "not enough data: under 10 treated or control records" in out


def test_stats_by_week_as_csv_with_a_rule_filter(workdir, env) -> None:
    shown = ok(["stats", "--by", "week", "--rule", "watch", "--format", "csv"], env, workdir)
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert shown.stdout.startswith("week,routed,recorded,held_out,suppressed,acknowledged,intervened,")
    assert [(r["week"], r["routed"], r["held_out"]) for r in rows] == [
        ("2026-W48", "20", "20"), ("2026-W49", "20", "20")]
    # one rule per row: the sample ratio check applies; null is an empty cell
    assert [r["srm_mismatch"] for r in rows] == ["false", "false"]
    # 5/20 treated vs 3/20 control successes each week
    assert [float(r["uplift"]) for r in rows] == [pytest.approx(0.10), pytest.approx(0.10)]
    assert rows[0]["p90_time_to_act_s"] == "5400.0"


def test_stats_groupings_and_filters(workdir, env) -> None:
    versions = json.loads(ok(["stats", "--by", "model_version", "--model", "retention", "--rule", "watch",
                              "--since", "2026-11-20", "--until", "2026-12-01T00:00:00", "--format", "json"],
                             env, workdir).stdout)
    assert [(r["model"], r["model_version"], r["routed"]) for r in versions] == [
        ("retention", "1", 30), ("retention", "2", 10)]
    owners = json.loads(ok(["stats", "--by", "owner", "--owner", "carol", "--format", "json"], env, workdir).stdout)
    assert [(r["owner"], r["routed"], r["held_out"]) for r in owners] == [("carol", 20, 20)]
    priority = json.loads(ok(["stats", "--by", "priority", "--model", "churn", "--format", "json"],
                             env, workdir).stdout)
    assert [(r["priority"], r["routed"], r["recorded"]) for r in priority] == [("high", 10, 2)]
    empty = ok(["stats", "--since", "2030-01-01"], env, workdir)
    assert "no alerts in this window yet" in empty.stdout
    header_only = ok(["stats", "--since", "2030-01-01", "--by", "model_version", "--format", "csv"], env, workdir)
    assert header_only.stdout.startswith("model,model_version,routed,") and header_only.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "--by", "team"], "--by must be one of rule, owner, model, model_version, priority, week"),
        (["stats", "--format", "xml"], "--format must be table, json or csv"),
        (["stats", "--since", "yesterday"], "--since: expected a duration like 7d or an ISO date"),
        (["stats", "--nope"], "No such option"),
        (["stats", "nope"], "No such command"),
        (["stats", "quality", "--format", "xml"], "--format must be table, json or csv"),
        (["stats", "quality", "--until", "soon"], "--until: expected a duration like 7d or an ISO date"),
        (["stats", "model", "--bands", "0.5,0.2"], "--bands: expected at least two strictly increasing finite numbers"),
        (["stats", "model", "--bands", "0,x,1"], "--bands: expected comma-separated numbers"),
        (["stats", "model", "--format", "yaml"], "--format must be table, json or csv"),
    ],
)
def test_bad_options_exit_2(workdir, env, args, message) -> None:
    shown = run(args, env, workdir)
    assert shown.returncode == 2, (shown.stdout, shown.stderr)
    assert message in shown.stderr
    assert shown.stdout == ""


def test_unreadable_store_exits_1(workdir, env) -> None:
    broken = {**env, "DECISION_ROUTER_DATABASE_URL": "postgresql+psycopg://nobody:secret@127.0.0.1:1/x"}
    shown = run(["stats", "quality"], broken, workdir)
    assert shown.returncode == 1
    assert "cannot read the store at postgresql+psycopg://nobody:***@127.0.0.1:1/x" in shown.stderr
    assert "secret" not in shown.stderr


def test_without_rules_the_sample_ratio_check_is_skipped_with_a_warning(workdir, env, tmp_path) -> None:
    no_rules = {**env, "DECISION_ROUTER_RULES_DIR": str(tmp_path)}
    shown = ok(["stats", "--format", "json", "--rule", "skewed"], no_rules, workdir)
    (row,) = json.loads(shown.stdout)
    assert row["srm_expected_fraction"] is None and row["srm_mismatch"] is None
    assert row["uplift"] is None  # skewed has no outcomes at all
    assert "the sample ratio check is skipped" in shown.stderr


def test_help_lists_the_subcommands(workdir, env) -> None:
    shown = ok(["stats", "--help"], env, workdir)
    assert "quality" in shown.stdout and "model" in shown.stdout and "--by" in shown.stdout


# stats quality -----------------------------------------------------------------------------


def test_stats_quality_json_and_table(workdir, env) -> None:
    document = json.loads(ok(["stats", "quality", "--since", "2026-11-09", "--until", "2026-11-11", "--format", "json"],
                             env, workdir).stdout)
    models = {row["model"]: row for row in document["models"]}
    assert set(models) == {"upsell", "credit", "(unknown)"}
    assert (models["upsell"]["accepted"], models["upsell"]["rejected"]) == (5, 3)
    assert models["upsell"]["fallback_owner_rate"] == 0.25 and models["upsell"]["missing_context_rate"] == 0.5
    assert models["upsell"]["missing_fields"] == {"context.arr": 2, "context.region": 1}
    assert models["(unknown)"]["rejected"] == 1 and models["(unknown)"]["missing_context_rate"] is None
    assert document["outcome_rejections"] == [{"reason": "unknown_alert", "count": 1}]

    table = ok(["stats", "quality", "--since", "2026-11-09", "--until", "2026-11-11"], env, workdir).stdout
    assert "upsell" in table and "(unknown)" in table and "missing_id" in table
    assert "context.arr 2, context.region 1" in table
    upsell = next(ln for ln in table.splitlines() if " upsell " in ln)
    assert "1 (25%)" in upsell and "2 (50%)" in upsell  # fallback owners, missing context
    assert "outcome events rejected (all models): unknown_alert 1" in table


def test_stats_quality_csv_for_one_model(workdir, env) -> None:
    shown = ok(["stats", "quality", "--model", "upsell", "--format", "csv"], env, workdir)
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert [(r["model"], r["accepted"], r["rejected"]) for r in rows] == [("upsell", "6", "4")]
    assert rows[0]["rejections"] == "stale=2;duplicate=1;schema=1"
    assert rows[0]["missing_fields"] == "context.arr=2;context.region=1"


# stats model -------------------------------------------------------------------------------


def test_stats_model_bands(workdir, env) -> None:
    rows = json.loads(ok(["stats", "model", "--model", "attrition", "--bands", "0,0.5,0.8,0.9,1.0", "--since",
                          "2026-11-01", "--format", "json"], env, workdir).stdout)
    assert [(r["model_version"], r["band_low"], r["band_high"]) for r in rows] == [
        (v, low, high) for v in ("1", "2") for low, high in ((0.0, 0.5), (0.5, 0.8), (0.8, 0.9), (0.9, 1.0))]
    top = rows[2]
    assert (top["held_out"], top["n"], top["positives"]) == (12, 11, 8)
    assert top["precision"] == pytest.approx(8 / 11)
    assert (top["ci_low"], top["ci_high"]) == pytest.approx((0.4344, 0.9025), abs=5e-5)
    assert rows[1]["precision"] is None and rows[1]["n"] == 0

    table = ok(["stats", "model", "--model", "attrition", "--bands", "0,0.5,0.8,0.9,1.0", "--since", "2026-11-01"],
               env, workdir).stdout
    first, second = [ln for ln in table.splitlines() if " 0.8-0.9 " in ln]
    assert " 1 " in first and "73%" in first and "43%-90%" in first  # version 1: 8 of 11
    assert " 2 " in second and "50%" in second
    assert "result: failure" in table and "nobody intervened" in table


def test_stats_model_default_deciles_as_csv(workdir, env) -> None:
    shown = ok(["stats", "model", "--model", "other", "--format", "csv"], env, workdir)
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    header = "model,model_version,band_low,band_high,held_out,n,positives,precision,ci_low,ci_high\n"
    assert shown.stdout.startswith(header)
    assert len(rows) == 10
    assert [(r["band_low"], r["n"], r["precision"]) for r in rows if r["n"] != "0"] == [("0.5", "1", "1.0")]
