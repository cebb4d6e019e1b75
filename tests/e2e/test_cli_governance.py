"""`rules test`, `rules replay`, `audit` and `reassign` from a user's seat: the CLI as a subprocess.

Stores are SQLite files written here with the tracker, so their rows are the ones the
service writes; only the `reassign` round trip runs `serve` (embedded Redis).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from fakeredis.aioredis import FakeRedis
from sqlmodel import Session, select

from decision_router import tracker
from decision_router.contracts import OutcomeEvent, Prediction
from decision_router.pipeline import Pipeline
from decision_router.router import in_holdout
from decision_router.rules import RuleSet, load_rules
from decision_router.settings import Settings
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord
from tests.e2e.helpers import CLI, ROOT, clean_env, free_port, run

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    return tmp_path


@pytest.fixture
def env(workdir: Path) -> dict[str, str]:
    return clean_env(DECISION_ROUTER_EMBEDDED_PORT=str(free_port()), DECISION_ROUTER_DATABASE_URL=f"sqlite:///{workdir / 'store.db'}")


@pytest.fixture
def shipped(workdir: Path) -> RuleSet:
    return load_rules(workdir / "rules")


def prediction(pid: str, score: float, entity_id: str | None = None, *, at: datetime = NOW, version: str = "2026.11",
               **context: Any) -> Prediction:
    return Prediction(
        prediction_id=pid, model="churn", model_version=version, entity_type="account", entity_id=entity_id or f"acct-{pid}",
        score=score, predicted_at=at - timedelta(minutes=1), features={"top_drivers": ["usage_drop"]}, context=context,
    )


def store(workdir: Path, ruleset: RuleSet, items: list[tuple[Prediction, datetime]]) -> list[list[tuple[str, str, str]]]:
    """Route, record and deliver each prediction through the service's pipeline, its clock at
    the given time (cooldowns included); (alert id, rule, effective action) of each decision,
    per prediction, in rule order."""
    engine = make_engine(f"sqlite:///{workdir / 'store.db'}")
    create_schema(engine)
    order = {rule.name: n for n, rule in enumerate(ruleset.rules)}

    async def route_all() -> None:
        redis = FakeRedis()
        # Predictions here are made at one time and received at another: let the gate's age
        # and skew checks admit them, they are not what these tests are about.
        lenient = Settings(max_prediction_age=timedelta(days=365), max_clock_skew=timedelta(days=365))
        pipeline = Pipeline(settings=lenient, ruleset=ruleset, engine=engine, redis=redis)
        for n, (item, at) in enumerate(items, start=1):
            pipeline.clock = lambda at=at: at
            result = await pipeline.process_predictions([(f"{n}-0", {"data": item.model_dump_json()})])
            assert result.accepted == 1, result
        await redis.aclose()

    asyncio.run(route_all())
    made = []
    with Session(engine) as session:
        for item, _ in items:
            records = session.scalars(select(AlertRecord).where(AlertRecord.prediction_id == item.prediction_id))
            made.append([(r.alert_id, r.rule, r.effective_action) for r in sorted(records, key=lambda r: order[r.rule])])
    engine.dispose()
    return made


def treated(ruleset: RuleSet, prefix: str) -> str:
    """An entity id in no rule's control group, so the expected counts do not depend on the hash."""
    fractions = [(r.name, r.holdout) for r in ruleset.rules if r.holdout]
    return next(f"{prefix}-{n}" for n in range(1000)
                if not any(in_holdout(name, "account", f"{prefix}-{n}", f) for name, f in fractions))


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return list(connection.iterdump())


# rules test ----------------------------------------------------------------------------


def test_rules_test_from_argument_file_and_stdin(workdir, env) -> None:
    strategic = prediction("t1", 0.92, segment="strategic", arr=650000, account_manager="benoit-garnier").model_dump_json()
    shown = run(["rules", "test", strategic], env, workdir)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"rules in rules/ (version {load_rules(workdir / 'rules').version}), evaluated at ")
    assert lines[1] == "t1 (argument): 2 rules match"
    assert lines[2] == "1. key-account-churn-visibility" and lines[3].strip() == "owner     dir-enterprise (static)"
    assert "2. enterprise-churn-risk" in lines
    assert "   owner     benoit-garnier (from field context.account_manager)" in lines
    assert "   missing   context.renewal_date, context.region" in lines

    ok = run(["rules", "test", strategic, "--expect-rule", "enterprise-churn-risk,key-account-churn-visibility",
              "--expect-owner", "benoit-garnier", "--expect-owner", "dir-enterprise"], env, workdir)
    assert ok.returncode == 0 and "expectations met" in ok.stderr

    wrong = run(["rules", "test", strategic, "--expect-owner", "enterprise-desk"], env, workdir)
    assert wrong.returncode == 1
    assert "mismatch: t1: expected owners enterprise-desk; got dir-enterprise, benoit-garnier" in wrong.stderr

    lines_file = workdir / "two.jsonl"
    lines_file.write_text(
        prediction("f1", 0.95, segment="enterprise").model_dump_json() + "\n"
        + prediction("f2", 0.2, segment="smb").model_dump_json() + "\n"
    )
    from_file = run(["rules", "test", "--file", str(lines_file), "--format", "json"], env, workdir)
    assert from_file.returncode == 0, from_file.stderr
    document = json.loads(from_file.stdout)
    assert document["rules_version"] == load_rules(workdir / "rules").version
    assert [(p["source"], p["prediction_id"], [(m["rule"], m["owner"], m["owner_why"]) for m in p["matches"]])
            for p in document["predictions"]] == [
        (f"{lines_file}:1", "f1", [("enterprise-churn-risk", "enterprise-desk", "fallback: context.account_manager missing")]),
        (f"{lines_file}:2", "f2", [("everything-else", "analytics-desk", "static")]),
    ]
    assert document["predictions"][1]["matches"][0]["treatment"] == "record"

    piped = run(["rules", "test", "--expect-rule", "everything-else"], env, workdir,
                input_text=prediction("s1", 0.1).model_dump_json())
    assert piped.returncode == 0, piped.stderr
    assert "s1 (stdin): 1 rule matches" in piped.stdout
    dash = run(["rules", "test", "-", "--format", "json"], env, workdir, input_text=prediction("s2", 0.1).model_dump_json())
    assert json.loads(dash.stdout)["predictions"][0]["source"] == "stdin"

    # Values are printed as they are, never read as terminal markup.
    odd = prediction("m1", 0.95, segment="enterprise", arr=900000, account_manager="[red]boss[/red]").model_dump_json()
    shown = run(["rules", "test", odd], env, workdir)
    assert "fallback: owner '[red]boss[/red]' not in directory" in shown.stdout
    assert 'context.account_manager="[red]boss[/red]"' in shown.stdout


def test_rules_test_file_with_a_line_that_is_not_utf8_judges_the_other_lines(workdir, env) -> None:
    lines_file = workdir / "mixed.jsonl"
    good = prediction("e1", 0.2, segment="smb").model_dump_json()
    bad = prediction("e2", 0.2, segment="caf\xe9").model_dump_json()
    lines_file.write_bytes(f"{good}\n{bad}\n".encode("latin-1"))
    shown = run(["rules", "test", "--file", str(lines_file)], env, workdir)
    assert shown.returncode == 2, shown.stderr
    assert f"e1 ({lines_file}:1): 1 rule matches" in shown.stdout
    at = bad.encode("latin-1").index(b"\xe9")  # as `publish` names it: the line, the byte's offset in it
    assert (f"error: {lines_file}:2: invalid prediction: invalid_encoding: field data is not valid UTF-8 (byte {at})"
            in shown.stderr)
    assert "Traceback" not in shown.stderr


def test_rules_test_rejects_bad_predictions_and_bad_rules(workdir, env) -> None:
    bad = run(["rules", "test", '{"prediction_id": "b1", "score": 0.5}'], env, workdir)
    assert bad.returncode == 2
    assert "error: argument: invalid prediction: missing_id: missing or empty: entity_type, entity_id" in bad.stderr
    out_of_range = json.loads(json.dumps(prediction("b2", 0.5).as_document()) .replace("0.5", "1.5"))
    bad = run(["rules", "test", json.dumps(out_of_range)], env, workdir)
    assert bad.returncode == 2 and "score_out_of_range: score 1.5 is outside 0..1" in bad.stderr
    # Old predictions are fine here: like `publish`, age is not checked.
    old = prediction("b3", 0.1, at=NOW - timedelta(days=400)).model_dump_json()
    assert run(["rules", "test", old], env, workdir).returncode == 0

    routing = workdir / "rules" / "routing.yaml"
    routing.write_text(routing.read_text().replace("owner: smb-desk", "owner: nobody-here", 1).replace("{gte: 0.9}", "{greater: 0.9}", 1))
    broken = run(["rules", "test", old], env, workdir)
    assert broken.returncode == 1
    assert "rule smb-churn-risk: owner: 'nobody-here' is not in the owner directory" in broken.stderr
    assert "unknown operator 'greater'" in broken.stderr and "2 problems in rules" in broken.stderr
    assert "Traceback" not in broken.stderr


# rules replay --------------------------------------------------------------------------


def candidate_rules(workdir: Path) -> Path:
    """The shipped rules with a higher enterprise-churn-risk threshold, smb-churn-risk owned by
    its team lead, and the medium-risk SMB accounts alerted instead of recorded."""
    candidate = workdir / "candidate"
    shutil.copytree(workdir / "rules", candidate)
    routing = yaml.safe_load((candidate / "routing.yaml").read_text())
    rules = {rule["name"]: rule for rule in routing["rules"]}
    rules["enterprise-churn-risk"]["when"]["score"] = {"gte": 0.9}
    rules["smb-churn-risk"]["owner"] = "lead-smb"
    rules["smb-churn-watch"]["action"] = "alert"
    (candidate / "routing.yaml").write_text(yaml.safe_dump(routing, sort_keys=False))
    return candidate


def test_replay_counts_each_kind_of_change_and_writes_nothing(workdir, env, shipped) -> None:
    e = {name: treated(shipped, name) for name in ("b", "c", "d", "e")}
    h = timedelta(hours=1)
    items = [
        (prediction("A", 0.95, segment="enterprise", account_manager="alice-moreau"), NOW - 30 * h),  # unchanged
        (prediction("B", 0.85, e["b"], segment="enterprise", account_manager="alice-moreau"), NOW - 29 * h),  # rule, priority
        (prediction("C", 0.9, e["c"], segment="smb"), NOW - 28 * h),  # owner
        (prediction("C2", 0.9, e["c"], segment="smb"), NOW - 27 * h),  # suppressed by C's cooldown before and after: owner
        (prediction("D", 0.7, e["d"], segment="smb"), NOW - 26 * h),  # record -> alert: action
        (prediction("E", 0.82, e["e"], segment="strategic", arr=600000, account_manager="benoit-garnier"), NOW - 25 * h),
        (prediction("F", 0.75, treated(shipped, "f"), segment="mid-market", account_manager="maya-patel"), NOW - 24 * h),
        (prediction("G", 0.99, version="2026.11-shadow", segment="enterprise"), NOW - 23 * h),  # unchanged
        (prediction("OLD", 0.85, segment="enterprise", account_manager="alice-moreau"), NOW - 10 * 24 * h),  # outside 7d
    ]
    made = store(workdir, shipped, [(p, at) for p, at in items])
    assert [(rule, action) for _, rule, action in made[3]] == [("smb-churn-risk", "suppressed")]
    assert [rule for _, rule, _ in made[5]] == ["key-account-churn-visibility", "enterprise-churn-risk"]
    candidate = candidate_rules(workdir)
    before = dump(workdir / "store.db")

    same = run(["rules", "replay", "--rules", "rules", "--format", "json"], env, workdir)
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["replayed"] == 8 and json.loads(same.stdout)["unchanged"] == 8

    shown = run(["rules", "replay", "--rules", str(candidate), "--since", "7d", "--format", "json"], env, workdir)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert (report["replayed"], report["unchanged"], report["changed"]) == (
        8, 3, {"rule": 2, "owner": 2, "priority": 2, "action": 1}
    )
    assert report["current_rules_version"] == shipped.version
    assert report["candidate_rules_version"] == load_rules(candidate).version != shipped.version
    assert report["recorded_rules_versions"] == {shipped.version: 8}
    assert report["examples"]["rule"] == [
        {"prediction_id": "B", "entity": f"account:{e['b']}", "before": "enterprise-churn-risk", "after": "enterprise-churn-watch"},
        {"prediction_id": "E", "entity": f"account:{e['e']}", "before": "key-account-churn-visibility, enterprise-churn-risk",
         "after": "key-account-churn-visibility, enterprise-churn-watch"},
    ]
    assert report["examples"]["owner"][1] == {
        "prediction_id": "C2", "entity": f"account:{e['c']}", "before": "smb-churn-risk: smb-desk", "after": "smb-churn-risk: lead-smb",
    }
    assert report["examples"]["action"] == [
        {"prediction_id": "D", "entity": f"account:{e['d']}", "before": "smb-churn-watch: record", "after": "smb-churn-watch: alert"},
    ]

    table = run(["rules", "replay", "--rules", str(candidate), "--examples", "1"], env, workdir)
    assert table.returncode == 0, table.stderr
    text = table.stdout
    assert f"current rules in rules/ (version {shipped.version})" in text
    assert f"candidate rules in {candidate}/ (version " in text
    for label, count in (("replayed", 8), ("unchanged", 3), ("rule changed", 2), ("owner changed", 2),
                         ("priority changed", 2), ("action changed", 1)):
        assert any(line.split() == [*label.split(), str(count)] for line in text.splitlines()), (label, text)
    assert "owner changed: 1 of 2 shown" in text
    assert f"  C  account:{e['c']}  smb-churn-risk: smb-desk -> smb-churn-risk: lead-smb" in text

    assert dump(workdir / "store.db") == before  # read-only


def test_replay_empty_window_and_invalid_candidate(workdir, env, shipped) -> None:
    store(workdir, shipped, [(prediction("A", 0.95, segment="enterprise"), NOW - timedelta(days=3))])
    empty = run(["rules", "replay", "--rules", "rules", "--since", "1d"], env, workdir)
    assert empty.returncode == 0, empty.stderr
    assert "no predictions received in" in empty.stdout and "nothing to replay" in empty.stdout
    until = run(["rules", "replay", "--rules", "rules", "--since", "7d", "--until", "4d", "--format", "json"], env, workdir)
    assert json.loads(until.stdout)["replayed"] == 0

    bad = workdir / "bad"
    shutil.copytree(workdir / "rules", bad)
    (bad / "routing.yaml").write_text((bad / "routing.yaml").read_text().replace("owner: analytics-desk", "owner: ghost"))
    invalid = run(["rules", "replay", "--rules", "bad"], env, workdir)
    assert invalid.returncode == 1
    problems = [line for line in invalid.stderr.splitlines() if "'ghost' is not in the owner directory" in line]
    assert len(problems) == 2  # shadow-models and everything-else
    assert "2 problems in bad" in invalid.stderr


# audit ---------------------------------------------------------------------------------


def populate_story(workdir: Path, shipped: RuleSet) -> tuple[str, str]:
    """One enterprise alert worked to a success, plus a copy for the director; returns (alert id, entity id)."""
    entity = treated(shipped, "story")
    t0 = NOW - timedelta(days=2)
    item = prediction("S1", 0.93, entity, at=t0, segment="strategic", arr=700000, account_manager="alice-moreau")
    records = store(workdir, shipped, [(item, t0)])[0]
    alert_id = next(aid for aid, rule, _ in records if rule == "enterprise-churn-risk")
    engine = make_engine(f"sqlite:///{workdir / 'store.db'}")
    with Session(engine) as session:
        steps = [
            ({"type": "acknowledged", "actor": "alice-moreau"}, timedelta(minutes=30)),
            ({"type": "reassigned", "actor": "lead-strategic", "owner": "benoit-garnier", "note": "alice is on leave"},
             timedelta(hours=1)),
            ({"type": "intervened", "actor": "benoit-garnier", "action": "exec-call"}, timedelta(hours=5)),
            ({"type": "outcome", "actor": "crm", "result": "success", "value": 700000}, timedelta(days=1)),
        ]
        for n, (fields, after) in enumerate(steps):
            event = OutcomeEvent(alert_id=alert_id, at=t0 + after, **fields)
            alerts = tracker.find_alerts(session, event, now=t0 + after, outcome_window=timedelta(days=30))
            tracker.apply_outcome(session, event=event, alerts=alerts, source_id=f"9-{n}", now=t0 + after)
            session.commit()
    engine.dispose()
    return alert_id, entity


def test_audit_tells_the_story_in_order(workdir, env, shipped) -> None:
    alert_id, entity = populate_story(workdir, shipped)
    shown = run(["audit", alert_id], env, workdir)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"alert {alert_id}" in text and f"rules version {shipped.version}" in text
    assert "owner benoit-garnier (originally alice-moreau) via field" in text
    assert "other decisions for this prediction:" in text and "key-account-churn-visibility -> dir-enterprise" in text
    story = [
        "prediction S1 received",
        f"rule enterprise-churn-risk matched (rules {shipped.version}): owner alice-moreau (field), priority high",
        "delivered to alice-moreau via inbox",
        "acknowledged",
        "reassigned alice-moreau -> benoit-garnier (note: alice is on leave)",
        "intervened: exec-call",
        "outcome success, value 700000",
    ]
    positions = [text.find(part) for part in story]
    assert -1 not in positions, (positions, text)
    assert positions == sorted(positions)

    as_json = run(["audit", alert_id, "--format", "json"], env, workdir)
    document = json.loads(as_json.stdout)
    assert [e["type"] for e in document["events"]] == [
        "received", "routed", "delivered", "acknowledged", "reassigned", "intervened", "outcome"
    ]
    assert [e["actor"] for e in document["events"]][3:] == ["alice-moreau", "lead-strategic", "benoit-garnier", "crm"]
    assert document["events"][1]["detail"]["rules_version"] == shipped.version
    assert all(datetime.fromisoformat(e["at"]).tzinfo is not None for e in document["events"])
    assert document["alert"]["owner"] == "benoit-garnier" and document["alert"]["original_owner"] == "alice-moreau"
    assert [s["rule"] for s in document["siblings"]] == ["key-account-churn-visibility"]
    assert "DATABASE_URL" not in as_json.stdout and "sqlite" not in as_json.stdout

    by_entity = run(["audit", "--entity", f"account:{entity}", "--format", "json"], env, workdir)
    assert by_entity.returncode == 0, by_entity.stderr
    grouped = json.loads(by_entity.stdout)
    assert [p["prediction_id"] for p in grouped["predictions"]] == ["S1"]
    assert sorted(a["alert"]["rule"] for a in grouped["alerts"]) == ["enterprise-churn-risk", "key-account-churn-visibility"]
    table = run(["audit", "--entity", f"account:{entity}"], env, workdir)
    assert f"entity account:{entity}: 1 prediction, 2 decisions" in table.stdout


def test_audit_errors(workdir, env, shipped) -> None:
    populate_story(workdir, shipped)
    unknown = run(["audit", "al-000000000000000000000000"], env, workdir)
    assert unknown.returncode == 1 and "no alert 'al-000000000000000000000000' in the store" in unknown.stderr
    nothing = run(["audit", "--entity", "account:nobody"], env, workdir)
    assert nothing.returncode == 1 and "nothing recorded for entity 'account:nobody'" in nothing.stderr
    assert run(["audit", "--entity", "nobody"], env, workdir).returncode == 2
    assert run(["audit"], env, workdir).returncode == 2
    assert run(["audit", "al-1", "--entity", "account:x"], env, workdir).returncode == 2


# reassign ------------------------------------------------------------------------------


def test_reassign_checks_the_owner_directory(workdir, env) -> None:
    unknown = run(["reassign", "al-1", "--to", "alcie-moreau", "--by", "lead-strategic"], env, workdir)
    assert unknown.returncode == 2
    assert "owner 'alcie-moreau' is not in the owner directory" in unknown.stderr and "alice-moreau" in unknown.stderr
    # A known owner gets as far as publishing: nothing serves the embedded Redis here.
    known = run(["reassign", "al-1", "--to", "benoit-garnier", "--by", "lead-strategic"], env, workdir)
    assert known.returncode == 1 and "cannot reach Redis" in known.stderr
    # Rules that do not load: no check, publish anyway.
    (workdir / "rules" / "owners.yaml").write_text("owners: oops\n")
    unchecked = run(["reassign", "al-1", "--to", "ghost", "--by", "lead-strategic"], env, workdir)
    assert unchecked.returncode == 1 and "is not checked here" in unchecked.stderr and "cannot reach Redis" in unchecked.stderr


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_reassign_round_trip_through_serve(workdir, env) -> None:
    process = subprocess.Popen(CLI + ["serve"], env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = redis.Redis(port=int(env["DECISION_ROUTER_EMBEDDED_PORT"]), decode_responses=True)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve exited: {process.stderr.read()}")
            try:
                return client.exists("predictions") == 1
            except redis.ConnectionError:
                return False

        wait_for(ready, what="serve to start")
        item = prediction("R1", 0.95, segment="enterprise", account_manager="alice-moreau")
        client.xadd("predictions", {"data": item.model_dump_json()})
        wait_for(lambda: client.xlen("alerts:alice-moreau") == 1, what="the alert")
        alert_id = json.loads(client.xrange("alerts:alice-moreau")[0][1]["data"])["alert_id"]

        moved = run(["reassign", alert_id, "--to", "benoit-garnier", "--by", "lead-strategic", "--reason", "on leave"], env, workdir)
        assert moved.returncode == 0, moved.stderr
        assert "recorded reassigned on outcomes" in moved.stdout
        wait_for(lambda: client.xlen("alerts:benoit-garnier") == 1, what="the reassigned alert")
        assert json.loads(client.xrange("alerts:benoit-garnier")[0][1]["data"])["reassigned_from"] == "alice-moreau"
        entry = client.xrange("outcomes")[-1][1]
        assert json.loads(entry["data"]) == {"alert_id": alert_id, "type": "reassigned", "actor": "lead-strategic",
                                             "owner": "benoit-garnier", "note": "on leave"}

        def story() -> list[dict]:
            shown = run(["audit", alert_id, "--format", "json"], env, workdir)
            assert shown.returncode == 0, shown.stderr
            return json.loads(shown.stdout)["events"]

        wait_for(lambda: [e["type"] for e in story()][-2:] == ["reassigned", "delivered"], what="the story")
        reassigned = story()[-2]
        assert reassigned["actor"] == "lead-strategic"
        assert reassigned["detail"] == {"from_owner": "alice-moreau", "to_owner": "benoit-garnier", "note": "on leave"}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        client.close()
