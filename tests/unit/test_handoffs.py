"""Hand-offs without servers (fakeredis, in-memory SQLite), through the real pipeline and sweeper:
a reassignment to an owner who is away goes to their present delegate, as routing and escalation
do; and a manager removed from the directory by a hot reload does not end an escalation chain."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fakeredis.aioredis
import pytest
import redis.exceptions
from sqlalchemy import select
from sqlalchemy.pool import StaticPool
from sqlmodel import Session
from structlog.testing import capture_logs

from decision_router.escalation import EscalationSweeper
from decision_router.pipeline import Pipeline
from decision_router.rules import RuleSet, load_rules
from decision_router.settings import Settings
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, AuditEvent, EscalationRecord
from decision_router.tracker import alert_id_for
from tests.browser.seed import Clock

T0 = datetime(2026, 11, 25, 9, tzinfo=UTC)
ROUTING = """
defaults: {ack_within: 1h, act_within: 4h}
rules:
  - name: churn-high
    when: {model: churn}
    owner: {from: context.account_manager, fallback: desk}
  - name: rest
    when: {}
    owner: desk
    action: record
"""
OWNERS = """
owners:
  - {id: vp, name: VP}
  - {id: lead, name: Lead, manager: vp}
  - {id: am, name: Account Manager, manager: lead}
  - {id: desk, name: Desk}
  - {id: director, name: Director, manager: vp, away_until: "2099-01-01", delegate: deputy}
  - {id: deputy, name: Deputy Director, manager: lead}
"""


def rules(directory: Path, owners: str) -> RuleSet:
    directory.mkdir(exist_ok=True)
    (directory / "routing.yaml").write_text(ROUTING)
    (directory / "owners.yaml").write_text(owners)
    return load_rules(directory)


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    engine = make_engine("sqlite://", poolclass=StaticPool)
    create_schema(engine)
    redis = fakeredis.aioredis.FakeRedis()
    yield Pipeline(settings=Settings(stream_prefix="t:"), ruleset=rules(tmp_path / "rules", OWNERS), engine=engine,
                   redis=redis, clock=Clock(T0))
    await redis.aclose()
    engine.dispose()


async def route_to(pipeline: Pipeline, owner: str) -> str:
    document = {"prediction_id": "p-1", "model": "churn", "model_version": "1", "entity_type": "account",
                "entity_id": "acct-1", "score": 0.9, "predicted_at": T0.isoformat(),
                "context": {"account_manager": owner}}
    await pipeline.process_predictions([("1-0", {"data": json.dumps(document)})])
    return alert_id_for("p-1", "churn-high")


async def inbox(pipeline: Pipeline, owner: str) -> list[dict]:
    return [json.loads(fields[b"data"]) for _, fields in await pipeline.redis.xrange(pipeline.keys.inbox(owner))]


def events(pipeline: Pipeline, alert_id: str, kind: str) -> list[dict]:
    with Session(pipeline.engine) as session:
        return [e.detail for e in session.scalars(
            select(AuditEvent).where(AuditEvent.alert_id == alert_id, AuditEvent.type == kind).order_by(AuditEvent.id))]


def steps(pipeline: Pipeline, alert_id: str) -> list[tuple[int, str, str]]:
    with Session(pipeline.engine) as session:
        rows = session.execute(select(EscalationRecord.level, EscalationRecord.from_owner, EscalationRecord.to_owner)
                               .where(EscalationRecord.alert_id == alert_id).order_by(EscalationRecord.level))
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def sweep_after(pipeline: Pipeline, hours: float) -> None:
    pipeline.clock.now += timedelta(hours=hours)  # type: ignore[attr-defined]
    await EscalationSweeper(pipeline).sweep_once()


async def test_a_reassignment_to_an_away_owner_goes_to_their_present_delegate(pipeline: Pipeline) -> None:
    alert_id = await route_to(pipeline, "am")
    reassign = {"type": "reassigned", "alert_id": alert_id, "actor": "lead", "owner": "director", "note": "key account"}
    result = await pipeline.process_outcomes([("1-0", {"data": json.dumps(reassign)})])
    assert result.accepted == 1

    assert await inbox(pipeline, "director") == []
    (copy,) = await inbox(pipeline, "deputy")
    assert (copy["owner"], copy["reassigned_from"], copy["delegated_from"]) == ("deputy", "am", "director")
    (event,) = events(pipeline, alert_id, "reassigned")
    assert event == {"from_owner": "am", "to_owner": "deputy", "delegated_from": "director", "note": "key account"}
    with Session(pipeline.engine) as session:
        record = session.get(AlertRecord, alert_id)
        assert record is not None and record.delivered_at is not None
    # The delegate is accountable now: a missed deadline goes up the delegate's chain, as for a routed alert.
    await sweep_after(pipeline, 1.1)
    assert steps(pipeline, alert_id) == [(1, "deputy", "lead")]


async def test_a_reassignment_to_a_present_owner_drops_an_earlier_delegation(pipeline: Pipeline) -> None:
    alert_id = await route_to(pipeline, "director")
    assert (await inbox(pipeline, "deputy"))[0]["delegated_from"] == "director"
    reassign = {"type": "reassigned", "alert_id": alert_id, "actor": "lead", "owner": "am"}
    await pipeline.process_outcomes([("1-0", {"data": json.dumps(reassign)})])
    (copy,) = await inbox(pipeline, "am")
    assert (copy["owner"], copy["delegated_from"]) == ("am", None)
    assert events(pipeline, alert_id, "reassigned") == [{"from_owner": "deputy", "to_owner": "am"}]


async def test_a_manager_removed_by_a_reload_hands_the_chain_to_whoever_took_their_place(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    alert_id = await route_to(pipeline, "am")
    await sweep_after(pipeline, 1.1)
    assert steps(pipeline, alert_id) == [(1, "am", "lead")]
    # lead leaves; am now reports to new-lead.
    pipeline.ruleset = rules(tmp_path / "reloaded", OWNERS.replace(
        "  - {id: lead, name: Lead, manager: vp}\n", "  - {id: new-lead, name: New Lead, manager: vp}\n"
    ).replace("manager: lead}", "manager: new-lead}"))
    await sweep_after(pipeline, 1.1)
    assert steps(pipeline, alert_id) == [(1, "am", "lead"), (2, "lead", "new-lead")]
    (copy,) = await inbox(pipeline, "new-lead")
    assert copy["escalation"]["reason"] == (
        "not acknowledged within 1h (lead no longer in the owner directory; up from am)"
    )
    escalated = events(pipeline, alert_id, "escalated")[-1]
    assert (escalated["to_owner"], escalated["removed_from_directory"]) == ("new-lead", ["lead"])
    # The chain goes on from there: new-lead -> vp, then the breach at the top.
    await sweep_after(pipeline, 1.1)
    await sweep_after(pipeline, 1.1)
    assert steps(pipeline, alert_id)[-1] == (3, "new-lead", "vp")
    (breach,) = events(pipeline, alert_id, "sla_breached")
    assert breach["top_of_chain"] == "vp"


async def test_with_nobody_in_a_removed_managers_place_the_chain_goes_on_to_the_next_one_up(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    alert_id = await route_to(pipeline, "am")
    await sweep_after(pipeline, 1.1)
    # lead leaves and am reports to vp directly; deputy too.
    pipeline.ruleset = rules(tmp_path / "reloaded", OWNERS.replace(
        "  - {id: lead, name: Lead, manager: vp}\n", "").replace("manager: lead}", "manager: vp}"))
    await sweep_after(pipeline, 1.1)
    assert steps(pipeline, alert_id)[-1] == (2, "lead", "vp")
    with Session(pipeline.engine) as session:
        record = session.get(AlertRecord, alert_id)
        assert record is not None and (record.escalated_to, record.ack_breached_at) == ("vp", None)


async def test_a_removed_top_of_chain_breaches_at_the_new_top(pipeline: Pipeline, tmp_path: Path) -> None:
    alert_id = await route_to(pipeline, "am")
    await sweep_after(pipeline, 1.1)
    await sweep_after(pipeline, 1.1)
    assert steps(pipeline, alert_id)[-1] == (2, "lead", "vp")
    # vp leaves: lead is the top of the chain now.
    pipeline.ruleset = rules(tmp_path / "reloaded", OWNERS.replace("  - {id: vp, name: VP}\n", "").replace(
        ", manager: vp", ""))
    await sweep_after(pipeline, 1.1)
    (breach,) = events(pipeline, alert_id, "sla_breached")
    assert (breach["top_of_chain"], breach["removed_from_directory"]) == ("lead", ["vp"])
    assert breach["reason"] == (
        "not acknowledged within 1h (vp no longer in the owner directory; lead is the top of the chain now)"
    )


async def test_steps_taken_are_logged_even_when_writing_the_copies_fails(pipeline: Pipeline) -> None:
    """The steps are committed before their copies go out: Redis down at that moment must not lose the sweep's
    log line (the next sweep delivers the copies, with nothing left to escalate and so nothing to log)."""
    await route_to(pipeline, "am")
    pipeline.clock.now += timedelta(hours=1.1)  # type: ignore[attr-defined]
    sweeper = EscalationSweeper(pipeline)

    async def redis_down() -> int:
        raise redis.exceptions.ConnectionError("Connection refused")

    sweeper.deliver = redis_down  # type: ignore[method-assign]
    with capture_logs() as logs, pytest.raises(redis.exceptions.ConnectionError):
        await sweeper.sweep_once()
    (line,) = [e for e in logs if e["event"] == "escalations"]
    assert (line["escalated"], line["sla_breaches"]) == (1, 0)
