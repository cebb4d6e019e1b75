"""Dashboard read models: hand-worked figures on small fixtures, and agreement with
stats.compute_stats / compute_quality on a store seeded through the real pipeline."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fakeredis.aioredis
import pytest
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from decision_router import insights
from decision_router.pipeline import Pipeline
from decision_router.rules import load_rules
from decision_router.settings import Settings
from decision_router.stats import compute_quality, compute_stats
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, EscalationRecord, RejectionRecord
from tests.browser.seed import Clock, seed
from tests.unit.test_stats import HOLDOUTS, T0, alert, known_records

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


def memory_store(records=()):
    engine = make_engine("sqlite://", poolclass=StaticPool)
    create_schema(engine)
    with Session(engine) as session:
        session.add_all(records)
        session.commit()
    return engine


@pytest.fixture(scope="module")
def known():
    return memory_store(known_records())


def test_funnel_and_uplift_are_the_stats_rows_of_alerting_rules(known) -> None:
    with Session(known) as session:
        rows = insights.rule_stats(session, holdouts=HOLDOUTS)
    funnel = {row.rule: row for row in insights.funnel(rows)}
    assert "catch-all" not in funnel  # record-only: nobody to act
    churn = funnel["churn-high"]
    assert (churn.routed, churn.acknowledged, churn.intervened, churn.successes, churn.failures) == (10, 8, 5, 3, 2)
    uplift = {row.rule: row for row in insights.uplift(rows, HOLDOUTS)}
    watch = uplift["watch"]
    assert watch.uplift == pytest.approx(0.10)
    assert (watch.ci_low, watch.ci_high) == (pytest.approx(-0.0775, abs=1e-4), pytest.approx(0.2714, abs=1e-4))
    assert watch.has_control and (watch.treated_n, watch.control_n) == (40, 40)
    assert uplift["tiny"].uplift is None and uplift["tiny"].has_control  # not enough data
    assert not uplift["fraud"].has_control


def test_time_to_act_buckets(known) -> None:
    with Session(known) as session:
        histogram = insights.time_to_act_histogram(session)
        watch_only = insights.time_to_act_histogram(session, rule="watch")
    counts = {b.label: b.count for b in histogram.buckets}
    # churn-high acted after 1..5 min; watch after 10, 20, ..., 100 min (60 min falls in 1h-4h).
    assert counts == {"< 15m": 6, "15m–1h": 4, "1h–4h": 5, "4h–1d": 0, "1d–2d": 0, "2d–1w": 0, "≥ 1w": 0}
    assert (histogram.acted, histogram.not_acted) == (15, 1251 - 15)
    assert [b.count for b in watch_only.buckets][:3] == [1, 4, 5]
    assert histogram.buckets[-1].high_s is None and histogram.buckets[1].low_s == 900


def test_time_to_act_edges_must_increase(known) -> None:
    with Session(known) as session, pytest.raises(ValueError, match="strictly increasing"):
        insights.time_to_act_histogram(session, edges=(3600, 60))


def timed(record: AlertRecord) -> AlertRecord:
    """With the due times the pipeline gives a routed alert (its first deadlines, until met)."""
    if record.status == "open" and record.action == "alert" and not record.held_out:
        record.ack_due_at = record.ack_by if record.acknowledged_at is None else None
        record.act_due_at = record.act_by if record.intervened_at is None else None
    return record


def test_owner_sla_counts_open_overdue_and_escalated() -> None:
    now = T0 + timedelta(hours=5)
    late = timed(alert(1, rule="r", owner="alice"))  # ack_by T0+4h missed
    acked = timed(alert(2, rule="r", owner="alice", ack=True))  # act_by T0+2d still ahead
    closed = alert(3, rule="r", owner="alice", outcome="success")
    escalated = timed(alert(4, rule="r", owner="alice"))
    escalated.escalation_level, escalated.ack_breached_at = 2, T0 + timedelta(hours=4, minutes=30)
    escalated.escalated_to, escalated.ack_due_at = "vp", None  # breached at the top of the chain
    fresh = timed(alert(5, rule="r", owner="bob", created=T0 + timedelta(hours=3)))  # ack_by T0+7h
    control = alert(6, rule="r", owner="bob", held_out=True)
    record = alert(7, rule="r", owner="bob", action="record")
    suppressed = alert(8, rule="r", owner="bob")
    suppressed.suppressed_by = "al-r-5"
    other_model = timed(alert(9, rule="r", owner="carol", model="fraud"))
    engine = memory_store([late, acked, closed, escalated, fresh, control, record, suppressed, other_model])
    with Session(engine) as session:
        rows = insights.owner_sla(session, now=now)
        churn = insights.owner_sla(session, now=now, model="churn")
    assert [(r.owner, r.open, r.overdue, r.escalated, r.breached) for r in rows] == [
        ("alice", 3, 2, 1, 1), ("carol", 1, 1, 0, 0), ("bob", 1, 0, 0, 0),
    ]
    assert [r.owner for r in churn] == ["alice", "bob"]


def test_overdue_is_by_the_owners_own_deadlines_as_the_escalation_sweep_reads_them() -> None:
    """A reassignment gives the new owner fresh deadlines (ack_due_at, act_due_at); overdue read the alert's first
    ones (ack_by, act_by), so an alert reassigned after its first ack deadline was overdue to its new owner at once."""
    now = T0 + timedelta(hours=5)  # past every alert's ack_by (T0+4h); act_by T0+2d ahead
    reassigned = timed(alert(1, rule="r", owner="bob"))
    reassigned.original_owner, reassigned.escalation_level, reassigned.ack_breached_at = "alice", 1, T0 + timedelta(hours=4)
    reassigned.ack_due_at = now - timedelta(minutes=10) + timedelta(hours=4)  # reassigned 10 min ago: fresh 4h
    late_again = timed(alert(2, rule="r", owner="bob"))  # reassigned at T0: its fresh ack deadline passed too
    late_again.original_owner = "alice"
    # Escalated for the ack (the manager's deadline pushed it to T0+8h): overdue for its owner; the act is not due.
    ack_step = timed(alert(3, rule="r", owner="carol"))
    ack_step.escalation_level, ack_step.escalated_to, ack_step.ack_due_at = 1, "lead", T0 + timedelta(hours=8)
    # Escalated for the act (both deadlines missed, the act's pushed to the manager's): both overdue.
    act_step = timed(alert(4, rule="r", owner="dave"))
    act_step.escalation_level, act_step.escalated_to = 1, "lead"
    act_step.ack_due_at, act_step.act_due_at = None, now + timedelta(days=2)
    steps = [
        EscalationRecord(alert_id=ack_step.alert_id, level=1, kind="ack", from_owner="carol", to_owner="lead",
                         reason="x", at=T0 + timedelta(hours=4)),
        EscalationRecord(alert_id=act_step.alert_id, level=1, kind="act", from_owner="dave", to_owner="lead",
                         reason="x", at=now),
    ]
    ids = [r.alert_id for r in (reassigned, late_again, ack_step, act_step)]
    engine = memory_store([reassigned, late_again, ack_step, act_step, *steps])
    with Session(engine) as session:
        sla = {row.owner: (row.open, row.overdue) for row in insights.owner_sla(session, now=now)}
        records = [session.get(AlertRecord, alert_id) for alert_id in ids]
        last = insights.last_steps(session, records)
        flags = [insights.overdue(r, now, last.get(r.alert_id)) for r in records]
    assert flags == [(False, False), (True, False), (True, False), (True, True)]
    assert sla == {"bob": (2, 1), "carol": (1, 1), "dave": (1, 1)}


def rejection(day: datetime, reason: str, model: str | None, stream: str = "p:predictions") -> RejectionRecord:
    return RejectionRecord(source_stream=stream, model=model, reason=reason, detail="x", at=day)


def test_rejections_per_day_fill_empty_days_and_filter_by_model() -> None:
    d1 = datetime(2026, 11, 20, 10, tzinfo=UTC)
    d3 = d1 + timedelta(days=2)
    engine = memory_store([
        rejection(d1, "schema", "churn"), rejection(d1, "schema", "churn"), rejection(d1, "stale", "fraud"),
        rejection(d3, "schema", None), rejection(d3, "unknown_alert", None, stream="p:outcomes"),
    ])
    with Session(engine) as session:
        everything = insights.rejections_per_day(session)
        churn = insights.rejections_per_day(session, model="churn")
        window = insights.rejections_per_day(
            session, model="(unknown)", since=datetime(2026, 11, 19, tzinfo=UTC),
            until=datetime(2026, 11, 23, tzinfo=UTC),
        )
    assert everything.days == ["2026-11-20", "2026-11-21", "2026-11-22"]
    assert everything.reasons == ["schema", "stale", "unknown_alert"]
    assert everything.counts == {"schema": [2, 0, 1], "stale": [1, 0, 0], "unknown_alert": [0, 0, 1]}
    assert everything.total == 5
    assert (churn.days, churn.counts) == (["2026-11-20"], {"schema": [2]})
    # until is exclusive: midnight of the 23rd ends the window on the 22nd.
    assert window.days == ["2026-11-19", "2026-11-20", "2026-11-21", "2026-11-22"]
    assert window.counts == {"schema": [0, 0, 0, 1]}


def test_windows_at_the_ends_of_the_calendar_give_views_not_overflows() -> None:
    """`until=0001-01-01` (or `since`/`until` in 9999) from the API: a window, empty or clamped."""
    d1 = datetime(2026, 11, 20, 10, tzinfo=UTC)
    first, last = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)
    engine = memory_store([rejection(d1, "schema", "churn"), *known_records()])
    with Session(engine) as session:
        for since, until in ((None, first), (first, first), (first, None), (last, None), (None, last), (first, last)):
            days = insights.rejections_per_day(session, since=since, until=until)
            assert (days.days == []) == (until is first), (since, until)
            insights.rule_stats(session, since=since, until=until)
            insights.time_to_act_histogram(session, since=since, until=until)
            insights.owner_sla(session, now=T0, since=since, until=until)


def test_empty_store_gives_empty_views() -> None:
    with Session(memory_store()) as session:
        assert insights.funnel(insights.rule_stats(session)) == []
        assert insights.time_to_act_histogram(session).acted == 0
        assert insights.owner_sla(session, now=T0) == []
        assert insights.rejections_per_day(session).days == []


async def test_views_agree_with_stats_on_a_pipeline_seeded_store() -> None:
    engine = memory_store()
    ruleset = load_rules(RULES_DIR)
    now = datetime.now(UTC)
    clock = Clock(now)
    redis = fakeredis.aioredis.FakeRedis()
    pipeline = Pipeline(settings=Settings(stream_prefix="t:"), ruleset=ruleset, engine=engine, redis=redis, clock=clock)
    await seed(pipeline, clock, now)
    await redis.aclose()
    holdouts = {rule.name: rule.holdout for rule in ruleset.rules}
    with Session(engine) as session:
        stats = {row.key: row for row in compute_stats(session, holdouts=holdouts)}
        rows = insights.rule_stats(session, holdouts=holdouts)
        histogram = insights.time_to_act_histogram(session)
        sla = insights.owner_sla(session, now=now)
        days = insights.rejections_per_day(session)
        quality = compute_quality(session)
    funnel = insights.funnel(rows)
    assert {row.rule for row in funnel} == {"enterprise-churn-watch", "enterprise-churn-risk", "mid-market-churn-risk"}
    for row in funnel:
        assert (row.routed, row.acknowledged, row.intervened) == (
            stats[row.rule].routed, stats[row.rule].acknowledged, stats[row.rule].intervened)
    watch = {row.rule: row for row in insights.uplift(rows, holdouts)}["enterprise-churn-watch"]
    assert watch.uplift is not None and watch.ci_low < watch.uplift < watch.ci_high
    assert histogram.acted == sum(row.intervened for row in stats.values())
    assert histogram.acted + histogram.not_acted == sum(row.routed for row in stats.values())
    assert sum(b.count for b in histogram.buckets if b.high_s is not None and b.high_s <= 3600) > 0
    # Unacknowledged high-risk alerts missed their 2h deadline and escalated once.
    assert any(row.escalated for row in sla) and all(row.overdue <= row.open for row in sla)
    by_reason = Counter({reason: sum(counts) for reason, counts in days.counts.items()})
    expected = Counter()
    for r in quality.rejections:
        expected[r.reason] += r.count
    for reason, n in quality.outcome_rejections:
        expected[reason] += n
    assert by_reason == expected and days.total == 5 and len(days.days) == 2


def test_open_alerts_are_the_owners_own_nearest_unmet_deadline_first() -> None:
    acted = alert(1, rule="r", owner="alice", ack=True, act_after_s=60)  # waiting for its outcome: last
    acked = alert(2, rule="r", owner="alice", ack=True)  # next deadline: act_by T0+2d
    fresh = alert(3, rule="r", owner="alice", created=T0 + timedelta(hours=1))  # ack_by T0+5h
    late = alert(4, rule="r", owner="alice", created=T0 + timedelta(hours=2))  # ack_by T0+6h
    closed = alert(5, rule="r", owner="alice", outcome="failure")
    control = alert(6, rule="r", owner="alice", held_out=True)
    others = alert(7, rule="r", owner="bob")
    engine = memory_store([acted, acked, fresh, late, closed, control, others])
    with Session(engine) as session:
        listed = [r.alert_id for r in insights.open_alerts(session, owner="alice")]
    assert listed == ["al-r-3", "al-r-4", "al-r-2", "al-r-1"]


def step(alert_id: str, level: int, from_owner: str, to_owner: str) -> EscalationRecord:
    return EscalationRecord(alert_id=alert_id, level=level, kind="ack", from_owner=from_owner, to_owner=to_owner,
                            reason="not acknowledged within 4h", at=T0 + timedelta(hours=5))


def test_open_alerts_of_a_manager_add_the_ones_escalated_to_them_at_any_level() -> None:
    own = alert(1, rule="r", owner="lead", created=T0 + timedelta(hours=3))  # ack_by T0+7h
    first = alert(2, rule="r", owner="alice")  # escalated to lead (level 1): ack_by T0+4h
    second = alert(3, rule="r", owner="bob", created=T0 + timedelta(hours=1))  # level 1 to kim, level 2 to lead
    twice = alert(4, rule="r", owner="alice", created=T0 + timedelta(hours=2))  # to lead at levels 1 and 3
    closed = alert(5, rule="r", owner="alice", outcome="success")  # escalated, but no longer open
    elsewhere = alert(6, rule="r", owner="bob")  # escalated to kim only
    steps = [step("al-r-2", 1, "alice", "lead"), step("al-r-3", 1, "bob", "kim"), step("al-r-3", 2, "kim", "lead"),
             step("al-r-4", 1, "alice", "lead"), step("al-r-4", 3, "vp", "lead"), step("al-r-5", 1, "alice", "lead"),
             step("al-r-6", 1, "bob", "kim")]
    engine = memory_store([own, first, second, twice, closed, elsewhere, *steps])
    with Session(engine) as session:
        listed = [r.alert_id for r in insights.open_alerts(session, owner="lead")]
        steps = insights.escalations_to(session, to_owner="lead", alert_ids=listed)
        alices = [r.alert_id for r in insights.open_alerts(session, owner="alice")]
        at_most_two = [r.alert_id for r in insights.open_alerts(session, owner="lead", limit=2)]
    # Each once, the nearest unmet deadline first, as for the owner's own.
    assert listed == ["al-r-2", "al-r-3", "al-r-4", "al-r-1"]
    assert steps == {"al-r-2": (1, "alice"), "al-r-3": (2, "kim"), "al-r-4": (3, "vp")}
    assert alices == ["al-r-2", "al-r-4"]  # the owner still sees them: escalation hands nothing over
    assert at_most_two == ["al-r-2", "al-r-3"]  # the two most urgent
