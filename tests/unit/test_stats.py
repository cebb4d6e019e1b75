"""Stats from fixtures with known answers.

`known_records()` builds a store whose every figure is worked out by hand below; the
PostgreSQL integration test and the CLI end-to-end test load the same records.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlmodel import Session

from decision_router.stats import GroupBy, compute_stats, compute_stats_reference, iso_week, nearest_rank, stats_columns
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
# A Monday of ISO week 48; the uplift fixture lives in weeks 48 and 49.
W48 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

# Configured holdouts of the fixture's rules, as load_rules would report them.
HOLDOUTS = {"churn-high": 0.0, "catch-all": 0.0, "fraud": 0.0, "watch": 0.5, "tiny": 0.2, "skewed": 0.5,
            "balanced": 0.5, "slight": 0.5}


def alert(n: int, *, rule: str, owner: str, action: str = "alert", ack: bool = False, act_after_s: int | None = None,
          outcome: str | None = None, created: datetime = T0, model: str | None = None, version: str = "1",
          ack_after_s: int | None = None, held_out: bool = False, priority: str = "high", score: float = 0.9,
          prediction_id: str | None = None, owner_source: str = "static",
          missing: list[str] | None = None) -> AlertRecord:
    ack_after = ack_after_s if ack_after_s is not None else (30 if ack else None)
    return AlertRecord(
        alert_id=f"al-{rule}-{n}", prediction_id=prediction_id or f"p-{rule}-{n}", rule=rule, owner=owner,
        original_owner=owner, owner_source=owner_source, priority=priority, action=action,
        model=model or ("fraud" if rule == "fraud" else "churn"), model_version=version, entity_type="account",
        entity_id=f"a{n}", score=score, rules_version="v", missing_context=missing or [],
        predicted_at=created, created_at=created, ack_by=created + timedelta(hours=4),
        act_by=created + timedelta(days=2),
        acknowledged_at=created + timedelta(seconds=ack_after) if ack_after is not None else None,
        intervened_at=created + timedelta(seconds=act_after_s) if act_after_s is not None else None,
        outcome=outcome, status="closed" if outcome else "open", held_out=held_out,
    )


def core_records() -> list[AlertRecord]:
    """The core-loop fixture (created in week 44/46)."""
    rows = []
    # churn-high: 10 routed to alice/bob; 8 acked; 5 intervened after 60..300 s; 3 successes, 2 failures
    for n in range(10):
        rows.append(alert(
            n, rule="churn-high", owner="alice" if n < 6 else "bob", ack=n < 8,
            act_after_s=60 * (n + 1) if n < 5 else None,
            outcome={0: "success", 1: "success", 2: "failure", 5: "success", 9: "failure"}.get(n),
        ))
    # catch-all: tracked only
    rows += [alert(n, rule="catch-all", owner="desk", action="record", outcome="success") for n in range(2)]
    # churn-high control group and cooldown suppressions: counted apart, never as routed
    rows += [alert(n, rule="churn-high", owner="alice", outcome="failure", held_out=True) for n in range(20, 23)]
    suppressed = alert(30, rule="churn-high", owner="alice")
    suppressed.suppressed_by, suppressed.status = "al-churn-high-0", "suppressed"
    rows.append(suppressed)
    # escalated twice, then breached its ack deadline at the top
    rows[3].escalation_level = 2
    rows[3].ack_breached_at = T0 + timedelta(hours=9)
    rows[4].escalation_level = 1
    # fraud: routed, nothing happened yet
    rows.append(alert(0, rule="fraud", owner="bob", created=T0 + timedelta(days=10)))
    return rows


def uplift_records() -> list[AlertRecord]:
    """Rules with a holdout (0.5 but for tiny), model "retention" (so the core fixture's figures stay apart).

    watch: 40 treated (10 success) vs 40 control (6 success): uplift +0.10, 95% CI (-0.0775, 0.2714).
      Treated n: acknowledged after (n+1) min for n < 20, intervened after (n+1)*10 min for n < 10.
      Half of each group in week 48, half in week 49; versions "1" (n < 30) and "2".
    tiny (holdout 0.2): 40 treated (20 success) vs 9 control (3 success): too small for an uplift.
    skewed 600 routed / 400 control, balanced 500 / 500, slight 60 / 40 (sample ratio check).
    """
    rows = []
    for n in range(40):
        rows.append(alert(
            n, rule="watch", owner="carol" if n % 2 else "dave", model="retention", version="1" if n < 30 else "2",
            created=W48 + timedelta(days=7 * (n % 2)), priority="normal",
            ack_after_s=60 * (n + 1) if n < 20 else None, act_after_s=600 * (n + 1) if n < 10 else None,
            outcome="success" if n < 10 else "failure",
        ))
        rows.append(alert(
            100 + n, rule="watch", owner="carol" if n % 2 else "dave", model="retention",
            created=W48 + timedelta(days=7 * (n % 2)), priority="normal", outcome="success" if n < 6 else "failure",
            held_out=True,
        ))
    for n in range(40):
        rows.append(alert(n, rule="tiny", owner="erin", model="retention", created=W48, priority="low",
                          outcome="success" if n < 20 else "failure"))
    for n in range(9):
        rows.append(alert(100 + n, rule="tiny", owner="erin", model="retention", created=W48, priority="low",
                          outcome="success" if n < 3 else "failure", held_out=True))
    for rule, routed, control in (("skewed", 600, 400), ("balanced", 500, 500), ("slight", 60, 40)):
        common = {"rule": rule, "owner": "frank", "model": "retention", "created": W48, "priority": "low"}
        rows += [alert(n, **common) for n in range(routed)]
        rows += [alert(10_000 + n, **common, held_out=True) for n in range(control)]
    return rows


def known_records() -> list[AlertRecord]:
    return core_records() + uplift_records()


@pytest.fixture(scope="module")
def store():
    """Written once per module: the tests only read it."""
    from sqlalchemy.pool import StaticPool

    engine = make_engine("sqlite://", poolclass=StaticPool)
    create_schema(engine)
    with Session(engine) as s:
        s.add_all(known_records())
        s.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def session(store):
    with Session(store) as s:
        yield s


# core loop -------------------------------------------------------------------------------


def test_stats_by_rule_have_exact_numbers(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.RULE)}
    high = rows["churn-high"]
    assert (high.routed, high.recorded, high.acknowledged, high.intervened) == (10, 0, 8, 5)
    assert (high.successes, high.failures) == (3, 2)
    assert high.intervention_rate == pytest.approx(0.5)
    assert high.acknowledged_rate == pytest.approx(0.8)
    assert high.success_rate == pytest.approx(0.6)
    assert high.median_time_to_act_s == pytest.approx(180.0)
    assert high.p90_time_to_act_s == pytest.approx(300.0)  # nearest rank: ceil(0.9 * 5) = 5th of 60..300
    assert high.median_time_to_ack_s == pytest.approx(30.0)
    assert (high.held_out, high.suppressed, high.escalations, high.sla_breaches) == (3, 1, 3, 1)
    assert (high.control_successes, high.control_failures) == (0, 3)


def test_rates_without_a_denominator_are_null_not_zero(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.RULE)}
    tracked = rows["catch-all"]
    assert (tracked.routed, tracked.recorded) == (0, 2)
    assert tracked.intervention_rate is None and tracked.success_rate is None and tracked.acknowledged_rate is None
    fraud = rows["fraud"]
    assert fraud.routed == 1 and fraud.success_rate is None and fraud.median_time_to_act_s is None
    assert fraud.p90_time_to_act_s is None and fraud.median_time_to_ack_s is None and fraud.p90_time_to_ack_s is None
    assert fraud.control_success_rate is None and fraud.treated_success_rate is None and fraud.uplift is None


def test_stats_by_owner_and_order(session) -> None:
    rows = compute_stats(session, by=GroupBy.OWNER, until=W48)
    assert [r.key for r in rows] == ["alice", "bob", "desk"]
    alice, bob = rows[0], rows[1]
    assert (alice.routed, alice.intervened, alice.successes, alice.failures) == (6, 5, 3, 1)
    assert (bob.routed, bob.successes, bob.failures) == (5, 0, 1)
    assert rows[0].as_dict(GroupBy.OWNER)["owner"] == "alice"


def test_stats_window(session) -> None:
    rows = compute_stats(session, by=GroupBy.MODEL, since=T0 + timedelta(days=1), until=W48)
    assert [(r.key, r.routed) for r in rows] == [("fraud", 1)]
    rows = compute_stats(session, by=GroupBy.MODEL, until=T0 + timedelta(days=1))
    assert [(r.key, r.routed, r.recorded) for r in rows] == [("churn", 10, 2)]
    # since is inclusive, until exclusive
    later = compute_stats(session, by=GroupBy.MODEL, since=T0 + timedelta(days=10))
    assert [r.key for r in later] == ["retention", "fraud"]
    assert [r.key for r in compute_stats(session, by=GroupBy.MODEL, until=T0 + timedelta(days=10))] == ["churn"]


# uplift ------------------------------------------------------------------------------------


def test_uplift_with_both_intervals(session) -> None:
    (watch,) = compute_stats(session, by=GroupBy.RULE, rule="watch", holdouts=HOLDOUTS)
    assert (watch.routed, watch.held_out, watch.treated_n, watch.control_n) == (40, 40, 40, 40)
    assert (watch.successes, watch.control_successes, watch.control_failures) == (10, 6, 34)
    assert watch.treated_success_rate == pytest.approx(0.25) == watch.success_rate
    assert watch.control_success_rate == pytest.approx(0.15)
    assert watch.uplift == pytest.approx(0.10)
    assert (watch.uplift_ci_low, watch.uplift_ci_high) == pytest.approx((-0.0775, 0.2714), abs=5e-5)
    # The always-valid interval contains the fixed one.
    assert watch.uplift_seq_low == pytest.approx(-0.2724, abs=5e-5)
    assert watch.uplift_seq_high == pytest.approx(0.4724, abs=5e-5)
    assert watch.uplift_seq_low < watch.uplift_ci_low and watch.uplift_seq_high > watch.uplift_ci_high


def test_too_small_groups_give_nulls_not_numbers(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)}
    tiny = rows["tiny"]
    assert (tiny.treated_n, tiny.control_n) == (40, 9)
    assert tiny.treated_success_rate == pytest.approx(0.5)
    assert tiny.control_success_rate == pytest.approx(3 / 9)  # a rate of 9 is a fact, not an estimate
    assert (tiny.uplift, tiny.uplift_ci_low, tiny.uplift_ci_high, tiny.uplift_seq_low, tiny.uplift_seq_high) == (
        None, None, None, None, None)
    # churn-high has 3 control records: too few as well
    assert rows["churn-high"].control_n == 3 and rows["churn-high"].uplift is None


def test_treated_are_only_alerts_of_rules_with_a_control_group(session) -> None:
    # Owner "alice" has churn-high alerts (no holdout configured, but 3 control records exist).
    (alice,) = compute_stats(session, by=GroupBy.OWNER, owner="alice", holdouts=HOLDOUTS)
    assert alice.treated_n == 4 and alice.control_n == 3
    # Model "churn": catch-all (record) and fraud are not part of any comparison.
    (churn,) = compute_stats(session, by=GroupBy.MODEL, model="churn", holdouts=HOLDOUTS)
    assert churn.treated_n == 5 and churn.success_rate == pytest.approx(0.6)
    # fraud has no control group: no treated group either, though its success rate stands.
    (fraud,) = compute_stats(session, by=GroupBy.MODEL, model="fraud", holdouts=HOLDOUTS)
    assert fraud.treated_n == 0 and fraud.treated_success_rate is None


def test_a_holdout_rule_before_its_first_control_record_lacks_data_not_a_control_group() -> None:
    # A new rule with a 10% holdout: its first 6 alerts happen to be all treated. More data is what it needs,
    # as the dashboard says; "no control group" (give the rule a holdout) is for rules without one.
    from decision_router.cli_stats import TABLE_COLUMNS

    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        s.add_all([alert(n, rule="fresh", owner="o", outcome="success") for n in range(6)]
                  + [alert(n, rule="fraud", owner="o", outcome="success") for n in range(6)])
        s.commit()
        rows = {r.key: r for r in compute_stats(s, holdouts={"fresh": 0.1, "fraud": 0.0})}
        reference = {r.key: r for r in compute_stats_reference(s, holdouts={"fresh": 0.1, "fraud": 0.0})}
    engine.dispose()
    (uplift_cell,) = [cell for column, _header, cell in TABLE_COLUMNS if column == "uplift"]
    assert rows["fresh"].held_out == 0 and rows["fresh"].treated_n == 6
    assert uplift_cell(rows["fresh"]) == uplift_cell(reference["fresh"]) == "not enough data"
    assert uplift_cell(rows["fraud"]) == uplift_cell(reference["fraud"]) == "no control group"
    assert list(rows["fresh"].as_dict()) == stats_columns(GroupBy.RULE)  # JSON and CSV are unchanged


# sample ratio check ------------------------------------------------------------------------


def test_sample_ratio_mismatch_is_flagged_per_rule(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)}
    skewed, balanced, slight = rows["skewed"], rows["balanced"], rows["slight"]
    assert (skewed.srm_expected_fraction, skewed.srm_observed_fraction) == (0.5, pytest.approx(0.4))
    assert skewed.srm_p_value == pytest.approx(2.5396e-10, rel=1e-4) and skewed.srm_mismatch is True
    assert balanced.srm_observed_fraction == pytest.approx(0.5) and balanced.srm_p_value == pytest.approx(1.0)
    assert balanced.srm_mismatch is False
    # The same 60/40 split on 100 decisions is within chance at the 0.001 threshold.
    assert slight.srm_p_value == pytest.approx(0.0455, abs=1e-4) and slight.srm_mismatch is False
    assert rows["watch"].srm_mismatch is False and rows["watch"].srm_observed_fraction == pytest.approx(0.5)


def test_srm_is_null_without_a_holdout_or_when_rows_mix_rules(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)}
    assert rows["churn-high"].srm_expected_fraction is None and rows["churn-high"].srm_mismatch is None  # holdout 0
    # Without the configured holdouts there is nothing to test against.
    bare = {r.key: r for r in compute_stats(session, by=GroupBy.RULE)}
    assert bare["skewed"].srm_mismatch is None and bare["skewed"].srm_expected_fraction is None
    # frank owns skewed, balanced and slight: a mixed row gets no check ...
    (frank,) = compute_stats(session, by=GroupBy.OWNER, owner="frank", holdouts=HOLDOUTS)
    assert (frank.srm_expected_fraction, frank.srm_p_value, frank.srm_mismatch) == (None, None, None)
    # ... but a row of one rule does, whatever the grouping.
    (week,) = compute_stats(session, by=GroupBy.WEEK, rule="skewed", holdouts=HOLDOUTS)
    assert week.srm_mismatch is True


def test_srm_not_applicable_below_twenty_decisions() -> None:
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        s.add_all([alert(n, rule="watch", owner="o", created=W48) for n in range(15)]
                  + [alert(100, rule="watch", owner="o", created=W48, held_out=True)])
        s.commit()
        (row,) = compute_stats(s, holdouts={"watch": 0.5})
    engine.dispose()
    assert row.srm_expected_fraction == 0.5 and row.srm_observed_fraction == pytest.approx(1 / 16)
    assert row.srm_p_value is None and row.srm_mismatch is None


def test_srm_is_not_judged_per_current_owner() -> None:
    # A sound 50% holdout: alice and bob each get 100 alerts and 100 control records. Then 60 of alice's
    # alerts are reassigned to bob; their control records stay alice's (nobody sees those to reassign them).
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    records = []
    for start, name in ((0, "alice"), (1000, "bob")):
        records += [alert(start + n, rule="watch", owner=name, created=W48) for n in range(100)]
        records += [alert(start + 500 + n, rule="watch", owner=name, created=W48, held_out=True) for n in range(100)]
    for record in records[:60]:
        record.owner = "bob"
    with Session(engine) as s:
        s.add_all(records)
        s.commit()
        holdouts = {"watch": 0.5}
        (rule,) = compute_stats(s, holdouts=holdouts)
        by_owner = compute_stats(s, by=GroupBy.OWNER, holdouts=holdouts)
        reference = compute_stats_reference(s, by=GroupBy.OWNER, holdouts=holdouts)
        owned = compute_stats(s, by=GroupBy.RULE, owner="bob", holdouts=holdouts)
    engine.dispose()
    assert rule.srm_mismatch is False and rule.srm_p_value == pytest.approx(1.0)  # the rule's split is sound
    # 160 / 100 and 40 / 100 (p < 0.001 both): no "SRM!" (tracking broken) for ordinary reassignments.
    assert [(r.key, r.routed, r.held_out) for r in by_owner] == [("bob", 160, 100), ("alice", 40, 100)]
    for row in (*by_owner, *reference, *owned):
        assert (row.srm_expected_fraction, row.srm_p_value, row.srm_mismatch) == (None, None, None), row.key


# groupings and quantiles -----------------------------------------------------------------


def test_times_to_ack_and_act_median_and_p90(session) -> None:
    (watch,) = compute_stats(session, rule="watch")
    # ack after 60..1200 s (20 alerts): median (600 + 660) / 2, p90 the 18th smallest
    assert watch.median_time_to_ack_s == pytest.approx(630.0)
    assert watch.p90_time_to_ack_s == pytest.approx(1080.0)
    # act after 600..6000 s (10 alerts): median (3000 + 3600) / 2, p90 the 9th smallest
    assert watch.median_time_to_act_s == pytest.approx(3300.0)
    assert watch.p90_time_to_act_s == pytest.approx(5400.0)
    assert watch.acknowledged_rate == pytest.approx(0.5) and watch.intervention_rate == pytest.approx(0.25)


def test_nearest_rank() -> None:
    assert nearest_rank([], 0.9) is None
    assert nearest_rank([5.0], 0.9) == 5.0
    assert nearest_rank([float(v) for v in range(1, 11)], 0.9) == 9.0
    assert nearest_rank([float(v) for v in range(1, 12)], 0.9) == 10.0  # ceil(9.9) = 10
    assert nearest_rank([3.0, 1.0, 2.0], 0.5) == 2.0
    with pytest.raises(ValueError):
        nearest_rank([1.0], 0.0)


def test_iso_week_keys() -> None:
    assert iso_week(W48) == "2026-W48"
    assert iso_week(datetime(2026, 11, 29, 23, 59, tzinfo=UTC)) == "2026-W48"  # Sunday
    assert iso_week(datetime(2026, 11, 30, 0, 0, tzinfo=UTC)) == "2026-W49"
    # ISO year: 2027-01-01 (a Friday) is in the last week of 2026, which has 53 weeks.
    assert iso_week(datetime(2027, 1, 1, 12, tzinfo=UTC)) == "2026-W53"
    assert iso_week(datetime(2026, 1, 1, 12, tzinfo=UTC)) == "2026-W01"
    # Naive datetimes (SQLite) are UTC; other offsets are converted first.
    assert iso_week(datetime(2026, 11, 30, 0, 30)) == "2026-W49"
    assert iso_week(datetime(2026, 11, 30, 0, 30, tzinfo=timezone(timedelta(hours=2)))) == "2026-W48"


def test_by_week_is_chronological(session) -> None:
    rows = compute_stats(session, by=GroupBy.WEEK, model="retention")
    assert [(r.key, r.routed, r.held_out) for r in rows] == [
        ("2026-W48", 20 + 40 + 1160, 20 + 9 + 940), ("2026-W49", 20, 20)]
    all_weeks = [r.key for r in compute_stats(session, by="week")]
    assert all_weeks == ["2026-W44", "2026-W46", "2026-W48", "2026-W49"]
    assert rows[0].as_dict(GroupBy.WEEK)["week"] == "2026-W48"


def test_by_model_version_and_priority(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.MODEL_VERSION, rule="watch")}
    assert set(rows) == {"retention 1", "retention 2"}
    assert (rows["retention 1"].routed, rows["retention 1"].successes, rows["retention 2"].routed) == (30, 10, 10)
    # control records are all version "1" in the fixture
    assert rows["retention 1"].held_out == 40 and rows["retention 2"].held_out == 0
    row = rows["retention 2"].as_dict(GroupBy.MODEL_VERSION)
    assert list(row)[:3] == ["model", "model_version", "routed"]
    assert (row["model"], row["model_version"]) == ("retention", "2")
    by_priority = {r.key: r.routed for r in compute_stats(session, by=GroupBy.PRIORITY)}
    assert by_priority == {"high": 11, "normal": 40, "low": 40 + 1160}  # fraud is high too


def test_filters_combine(session) -> None:
    rows = compute_stats(session, by=GroupBy.OWNER, rule="watch", owner="carol", since=W48 + timedelta(days=1))
    assert [(r.key, r.routed, r.held_out) for r in rows] == [("carol", 20, 20)]
    assert compute_stats(session, rule="watch", model="churn") == []
    assert compute_stats(session, by=GroupBy.RULE, owner="nobody") == []


def test_columns_keep_the_core_loop_first(session) -> None:
    core = ["routed", "recorded", "held_out", "suppressed", "acknowledged", "intervened", "successes", "failures",
            "intervention_rate", "success_rate", "median_time_to_act_s", "escalations", "sla_breaches"]
    assert stats_columns(GroupBy.MODEL)[: len(core) + 1] == ["model", *core]
    added = {"acknowledged_rate", "median_time_to_ack_s", "p90_time_to_act_s", "control_successes", "control_failures",
             "control_success_rate", "treated_success_rate", "uplift", "uplift_ci_low", "uplift_ci_high",
             "uplift_seq_low", "uplift_seq_high", "srm_expected_fraction", "srm_observed_fraction", "srm_p_value",
             "srm_mismatch"}
    assert added <= set(stats_columns(GroupBy.RULE))
    (row,) = compute_stats(session, rule="watch")
    assert list(row.as_dict(GroupBy.RULE)) == stats_columns(GroupBy.RULE)


def test_bad_grouping_is_an_error(session) -> None:
    with pytest.raises(ValueError):
        compute_stats(session, by="team")
