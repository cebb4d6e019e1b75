"""Looked-up context kept with the prediction: a prediction routed by rules that read lookup.*
(the real ContextEnricher on a Redis hash) is stored with what was looked up, `rules replay`
routes it to the same decision and reports nothing missing, and the stored document given to
`rules test` routes the same way. A store from before lookups were kept shows the difference."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fakeredis.aioredis import FakeRedis
from sqlmodel import Session

from decision_router.enrich import build_enricher
from decision_router.keys import Keys
from decision_router.pipeline import Pipeline
from decision_router.rules import load_rules
from decision_router.settings import Settings
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, PredictionRecord
from decision_router.tracker import alert_id_for
from tests.e2e.helpers import clean_env, run

NOW = datetime.now(UTC).replace(microsecond=0)
ROUTING = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
rules:
  - name: gold-churn
    when: {model: churn, lookup.crm.tier: gold}
    owner: {from: lookup.crm.manager, fallback: desk}
    context: [lookup.crm.health]
  - {name: rest, when: {}, owner: desk, action: record}
"""
OWNERS = "owners:\n  - {id: am, name: Account Manager}\n  - {id: desk, name: Desk}\n"
CRM = {"tier": "gold", "manager": "am", "health": "42"}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "routing.yaml").write_text(ROUTING)
    (tmp_path / "rules" / "owners.yaml").write_text(OWNERS)
    return tmp_path


@pytest.fixture
def env(workdir: Path) -> dict[str, str]:
    return clean_env(DECISION_ROUTER_DATABASE_URL=f"sqlite:///{workdir / 'store.db'}",
                     DECISION_ROUTER_RULES_DIR=str(workdir / "rules"))


def prediction(pid: str, entity_id: str) -> dict:
    return {"prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
            "entity_id": entity_id, "score": 0.7, "predicted_at": (NOW - timedelta(minutes=1)).isoformat()}


def route_with_lookups(workdir: Path, predictions: list[dict]) -> None:
    """Through the service's pipeline and enricher, the CRM hash of entity acct-1 in Redis."""
    engine = make_engine(f"sqlite:///{workdir / 'store.db'}")
    create_schema(engine)
    ruleset = load_rules(workdir / "rules")

    async def route_all() -> None:
        redis = FakeRedis()
        await redis.hset("context:account:acct-1", mapping=CRM)
        pipeline = Pipeline(settings=Settings(), ruleset=ruleset, engine=engine, redis=redis, clock=lambda: NOW)
        pipeline.enricher = build_enricher(ruleset, redis=redis, engine=engine, keys=Keys(""))
        entries = [(f"{n}-0", {"data": json.dumps(p)}) for n, p in enumerate(predictions, start=1)]
        result = await pipeline.process_predictions(entries)
        assert result.accepted == len(predictions), result
        await redis.aclose()

    asyncio.run(route_all())
    engine.dispose()


def stored_document(workdir: Path, pid: str) -> dict:
    engine = make_engine(f"sqlite:///{workdir / 'store.db'}")
    with Session(engine) as session:
        document = session.get(PredictionRecord, pid).document
        alert = session.get(AlertRecord, alert_id_for(pid, "gold-churn"))
        assert (alert.owner, alert.context) == ("am", {"lookup.crm.health": "42"})
    engine.dispose()
    return document


def replay_report(workdir: Path, env: dict[str, str]) -> dict:
    shown = run(["rules", "replay", "--rules", "rules", "--format", "json"], env, workdir)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_a_prediction_routed_with_lookups_replays_to_the_same_decision(workdir, env) -> None:
    # acct-1 has CRM context (gold-churn, owner from lookup.crm.manager); acct-2 has none (rest).
    route_with_lookups(workdir, [prediction("p1", "acct-1"), prediction("p2", "acct-2")])
    document = stored_document(workdir, "p1")
    assert document["lookup"] == {"crm": CRM}
    assert {k: v for k, v in document.items() if k != "lookup"} == {
        **prediction("p1", "acct-1"), "predicted_at": document["predicted_at"], "label": None, "features": {},
        "context": {}}

    report = replay_report(workdir, env)
    assert (report["replayed"], report["unchanged"], report["missing_lookups"]) == (2, 2, {})
    table = run(["rules", "replay", "--rules", "rules"], env, workdir)
    assert table.returncode == 0, table.stderr
    assert "lookup.* fields missing" not in table.stdout

    # `rules test` on the stored document (its lookup included) decides as the service did.
    tested = run(["rules", "test", json.dumps(document), "--format", "json",
                  "--expect-rule", "gold-churn", "--expect-owner", "am"], env, workdir)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    (case,) = json.loads(tested.stdout)["predictions"]
    assert case["lookup"] == {"crm": CRM}
    (match,) = case["matches"]
    assert (match["owner_why"], match["context"], match["missing_context"]) == (
        "from field lookup.crm.manager", {"lookup.crm.health": "42"}, [])


def test_a_store_from_before_lookups_were_kept_replays_them_as_missing_and_says_so(workdir, env) -> None:
    route_with_lookups(workdir, [prediction("p1", "acct-1"), prediction("p2", "acct-2")])
    with sqlite3.connect(workdir / "store.db") as connection:  # as an older release stored it
        connection.execute("update predictions set document = json_remove(document, '$.lookup')")

    report = replay_report(workdir, env)
    assert (report["replayed"], report["unchanged"], report["missing_lookups"]) == (2, 1, {"crm": 2})
    assert report["examples"]["rule"] == [
        {"prediction_id": "p1", "entity": "account:acct-1", "before": "gold-churn", "after": "rest"}]
    table = run(["rules", "replay", "--rules", "rules"], env, workdir)
    assert ("replayed without looked-up context they were not stored with (lookup.* fields missing): "
            "crm (2 predictions)") in table.stdout

    # Without a lookup object, `rules test` has none either: the rule reading it does not match.
    bare = run(["rules", "test", json.dumps(prediction("p1", "acct-1")), "--expect-rule", "gold-churn"], env, workdir)
    assert bare.returncode == 1 and "expected rules gold-churn; got rest" in bare.stderr
    bad = run(["rules", "test", json.dumps({**prediction("p1", "acct-1"), "lookup": {"crm": "gold"}})], env, workdir)
    assert bad.returncode == 2 and "invalid prediction: schema: lookup: expected an object of sources" in bad.stderr


def test_a_candidate_reading_a_field_the_rules_did_not_read_is_told_it_was_not_kept(workdir, env) -> None:
    # Only the fields the rules read are fetched and stored: a candidate that reads another field of the
    # same source replays without it, and the report counts it (as the current rules read no such field).
    route_with_lookups(workdir, [prediction("p1", "acct-1"), prediction("p2", "acct-2")])
    candidate = workdir / "candidate"
    candidate.mkdir()
    (candidate / "routing.yaml").write_text(ROUTING.replace(
        "context: [lookup.crm.health]", "context: [lookup.crm.health, lookup.crm.segment]"))
    (candidate / "owners.yaml").write_text(OWNERS)

    shown = run(["rules", "replay", "--rules", "candidate", "--format", "json"], env, workdir)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert (report["replayed"], report["missing_lookups"]) == (2, {"crm": 1})  # p1's gold-churn reads it
    same = replay_report(workdir, env)  # the current rules: every field they read was kept
    assert same["missing_lookups"] == {}
