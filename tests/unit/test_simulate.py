"""The simulator's pure parts: parameters, the world it draws, the truth it derives, its rules.

The end-to-end runs through the real service are in tests/integration/test_simulation.py.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from decision_router.router import in_holdout, route
from decision_router.simulate import (
    DEFAULT_OWNERS,
    RULE,
    WATCH_RULE,
    AlertLog,
    BandTally,
    OutcomeLog,
    SimulationParams,
    _distinct_models,
    _truncated_exponential,
    allowed_misses,
    band_tallies,
    build_world,
    compute_truth,
    intervention_probability,
    nearest_rank,
    owner_truths,
    precision_check,
    write_rules,
)
from decision_router.stats import BandRow
from decision_router.uplift import newcombe_difference, wilson_interval

START = datetime(2026, 3, 2, 8, tzinfo=UTC)


def test_defaults_describe_a_two_week_world() -> None:
    params = SimulationParams()
    assert (params.days, params.entities, params.effect, params.holdout) == (14, 2000, 0.1, 0.3)
    assert params.total_days == 14 + 12  # until the last result (12 days after a prediction) is in
    assert sum(params.per_day(d) for d in range(params.days)) == params.entities
    assert params.per_day(-1) == params.per_day(14) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"holdout": 1.0}, "holdout"),
        ({"effect": 1.5}, "effect"),
        ({"days": 0}, "days"),
        ({"outcome_delay_days": (4.0, 8.0)}, "after any intervention"),  # 2 + 3 days of owner delays
        ({"outcome_delay_days": (6.0, 31.0)}, "outcome window"),
        ({"owners": DEFAULT_OWNERS[:4]}, "fallback desk"),
        ({"drift_min_samples": 10}, "drift_min_samples"),
        ({"report_rate": 0.0}, "report_rate"),
        # Day 3 of a 3-day world publishes nothing: "drift injected, not flagged" would be a false story.
        ({"days": 3, "drift_from_day": 3}, "drift_from_day must be below days"),
    ],
)
def test_bad_parameters_are_refused_with_the_reason(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SimulationParams(), **change)


def test_truth_is_q_times_effect_when_nothing_is_clipped() -> None:
    params = SimulationParams(effect=0.1, threshold=0.5)
    q = intervention_probability(DEFAULT_OWNERS)
    assert q == pytest.approx(sum(o.weight * o.p_acknowledge * o.p_intervene for o in DEFAULT_OWNERS))
    truth = compute_truth(params)
    assert truth.intervention_probability == q
    assert truth.uplift == pytest.approx(q * 0.1, abs=1e-9)
    assert truth.treated_success_probability - truth.control_success_probability == pytest.approx(truth.uplift)
    # R ~ Beta(3, 2) given R >= 0.5: E[1 - R | R >= 0.5] = 0.29090..., P(R >= 0.5) = 11/16.
    assert truth.control_success_probability == pytest.approx(0.2909090909, abs=1e-6)
    assert truth.match_probability == pytest.approx(11 / 16, abs=1e-6)
    assert compute_truth(replace(params, effect=0.0)).uplift == 0.0


def test_truth_accounts_for_clipping_at_a_success_probability_of_one() -> None:
    # Every account matches (threshold 0): an account with R < 0.3 cannot gain the whole 0.3.
    params = SimulationParams(effect=0.3, threshold=0.0)
    rng = random.Random(1)
    draws = [rng.betavariate(3, 2) for _ in range(200_000)]
    gain = sum(min(1.0, 1 - r + 0.3) - (1 - r) for r in draws) / len(draws)
    truth = compute_truth(params)
    assert truth.uplift == pytest.approx(truth.intervention_probability * gain, abs=2e-3)
    assert truth.uplift < truth.intervention_probability * 0.3


def test_truth_with_drift_mixes_the_days_before_and_after_it() -> None:
    params = SimulationParams(effect=0.1, threshold=0.6, days=10, entities=1000, drift_from_day=5, drift_shift=0.2)
    truth = compute_truth(params)
    before = compute_truth(replace(params, drift_from_day=None))
    # Drifted scores pull lower-risk accounts (more likely to renew) over the threshold.
    assert truth.match_probability > before.match_probability
    assert truth.control_success_probability > before.control_success_probability
    assert truth.uplift == pytest.approx(truth.intervention_probability * 0.1, abs=1e-9)  # still no clipping


def _estimate_from_the_world(params: SimulationParams) -> tuple[int, int, int, int]:
    """(treated successes, treated, control successes, control) as the world's own draws imply,
    without the pipeline: owners act as their profile says, results follow the success probability."""
    accounts, _ = build_world(params, START)
    ts = tn = cs = cn = 0
    for a in accounts:
        if not a.matched:
            continue
        acted = a.u_ack < a.owner.p_acknowledge and a.u_act < a.owner.p_intervene
        if a.held_out:  # acted on anyway, or not at all: the simulator's rule (_schedule_control_act)
            acted = a.u_act < params.control_act_rate
        p_success = min(1.0, max(0.0, 1 - a.risk + (params.effect if acted else 0.0)))
        if a.held_out:
            cn, cs = cn + 1, cs + (a.u_outcome < p_success)
        else:
            tn, ts = tn + 1, ts + (a.u_outcome < p_success)
    return ts, tn, cs, cn


@pytest.mark.parametrize(
    "params",
    [
        SimulationParams(days=2, entities=120, effect=0.1, holdout=0.3, threshold=0.5, bad_input_rate=0),
        SimulationParams(days=2, entities=120, effect=0.0, holdout=0.5, threshold=0.2, bad_input_rate=0),
        # A large effect at a low threshold: many intervened accounts hit a success probability of 1.
        SimulationParams(days=2, entities=120, effect=0.6, holdout=0.5, threshold=0.2, bad_input_rate=0),
        # Owners act on a third of the control accounts anyway: the control group carries part of the effect.
        SimulationParams(days=2, entities=120, effect=0.3, holdout=0.5, threshold=0.3, bad_input_rate=0,
                         control_act_rate=0.35),
    ],
    ids=["effect", "no-effect", "clipped", "controls-acted-on"],
)
def test_the_truth_is_what_the_worlds_draws_average_to(params: SimulationParams) -> None:
    """Over 200 seeded worlds the uplift the draws imply averages to the derived truth, and
    the Newcombe interval covers it at close to 95%. (The integration tests show the pipeline
    reports exactly these draws.)"""
    truth = compute_truth(params).uplift
    estimates, covered = [], 0
    for seed in range(200):
        found = newcombe_difference(*_estimate_from_the_world(replace(params, seed=seed)))
        assert found is not None
        estimate, low, high = found
        estimates.append(estimate)
        covered += low <= truth <= high
    standard_error = statistics.stdev(estimates) / len(estimates) ** 0.5
    assert abs(statistics.fmean(estimates) - truth) < 3.5 * standard_error, (statistics.fmean(estimates), truth)
    assert 0.90 <= covered / len(estimates) <= 0.99


def test_controls_acted_on_anyway_shrink_the_uplift_and_raise_the_control_success() -> None:
    params = SimulationParams(effect=0.1, threshold=0.5)
    plain, mixed = compute_truth(params), compute_truth(replace(params, control_act_rate=0.2))
    q = plain.intervention_probability
    assert mixed.uplift == pytest.approx((q - 0.2) * 0.1, abs=1e-9)
    assert mixed.control_success_probability == pytest.approx(plain.control_success_probability + 0.2 * 0.1)
    assert mixed.treated_success_probability == pytest.approx(plain.treated_success_probability)
    with pytest.raises(ValueError, match="control_act_rate"):
        replace(params, control_act_rate=1.5)


# --- model precision: the simulator's record and the check against `stats model` ---------------------

EDGES = (0.0, 0.5, 0.8, 1.0)
EDGES10 = tuple(i / 10 for i in range(11))  # `stats model`'s default deciles


def _result(entity: str, churned: bool) -> OutcomeLog:
    return OutcomeLog(entity, "control", False, not churned, START)


def test_band_tallies_count_what_the_stats_count_by_their_band_rules() -> None:
    units = [
        (0.5, 0.4, _result("a", True)),  # on an edge: the band above
        (0.79, 0.9, _result("b", False)),
        (0.6, 0.7, None),  # held out, no result yet
        (1.0, 1.0, _result("c", True)),  # the top edge: in the last band
        (-0.1, 0.2, _result("d", True)),  # outside the edges: in no band
    ]
    assert band_tallies(units, EDGES) == [
        BandTally(0.0, 0.5, 0, 0, 0, None),
        BandTally(0.5, 0.8, 3, 2, 1, pytest.approx(0.65)),
        BandTally(0.8, 1.0, 1, 1, 1, 1.0),
    ]


@pytest.mark.parametrize(("bands", "allowed"), [(0, 0), (1, 1), (3, 1), (5, 2), (9, 2), (10, 3)])
def test_allowed_misses_keep_a_correct_run_failing_under_one_percent(bands: int, allowed: int) -> None:
    assert allowed_misses(bands) == allowed

    def above(m: int) -> float:  # P(Binomial(bands, 0.05) > m)
        return sum(math.comb(bands, k) * 0.05**k * 0.95 ** (bands - k) for k in range(m + 1, bands + 1))

    assert above(allowed) <= 0.01 and (allowed == 0 or above(allowed - 1) > 0.01)


def _row(low: float, high: float, held_out: int, n: int, positives: int) -> BandRow:
    low_ci, high_ci = wilson_interval(positives, n) or (None, None)
    return BandRow("churn", "v1", low, high, held_out, n, positives, positives / n if n else None, low_ci, high_ci)


SIMULATED = [
    BandTally(0.0, 0.5, 40, 38, 10, 0.3), BandTally(0.5, 0.8, 50, 50, 31, 0.65), BandTally(0.8, 1.0, 0, 0, 0, None),
]


def test_precision_check_passes_when_the_stats_match_the_log() -> None:
    rows = [_row(0.0, 0.5, 40, 38, 10), _row(0.5, 0.8, 50, 50, 31), _row(0.8, 1.0, 0, 0, 0)]
    check = precision_check(SIMULATED, rows)
    assert check.counts_equal and check.calibrated and (check.judged, check.misses) == (2, 0)


@pytest.mark.parametrize(
    "rows",
    [
        [_row(0.0, 0.5, 41, 38, 10), _row(0.5, 0.8, 50, 50, 31), _row(0.8, 1.0, 0, 0, 0)],  # one control too many
        [_row(0.0, 0.5, 40, 38, 28), _row(0.5, 0.8, 50, 50, 19), _row(0.8, 1.0, 0, 0, 0)],  # positives swapped
        [_row(0.0, 0.5, 40, 38, 10), _row(0.5, 0.8, 50, 50, 31)],  # a band missing
        [_row(0.0, 0.5, 40, 38, 10), _row(0.5, 0.8, 50, 50, 31), _row(0.8, 1.0, 0, 0, 0), _row(0.8, 1.0, 1, 0, 0)],
    ],
    ids=["held-out", "positives-swapped", "band-missing", "row-extra"],
)
def test_precision_check_fails_on_any_count_the_stats_get_wrong(rows: list[BandRow]) -> None:
    assert not precision_check(SIMULATED, rows).counts_equal


def test_precision_check_passes_without_a_control_group_when_stats_model_is_empty() -> None:
    # holdout 0: no account is held out, and `stats model` lists no row at all (it shows a model's
    # bands only once it has a control prediction). Zero in every band is what the log says too.
    empty = [replace(s, held_out=0, n=0, positives=0, true_precision=None) for s in SIMULATED]
    check = precision_check(empty, [])
    assert check.counts_equal and check.calibrated and check.judged == 0
    assert all(band.counts_equal for band in check.bands)
    # An empty report is no match for a log that held accounts out.
    assert not precision_check(SIMULATED, []).counts_equal


def test_precision_check_fails_when_intervals_miss_the_truth_too_often() -> None:
    # Counts right, but each interval collapsed onto its estimate: it contains neither true precision.
    rows = [replace(r, ci_low=r.precision, ci_high=r.precision) for r in
            (_row(0.0, 0.5, 40, 38, 10), _row(0.5, 0.8, 50, 50, 31), _row(0.8, 1.0, 0, 0, 0))]
    check = precision_check(SIMULATED, rows)
    assert check.counts_equal and (check.judged, check.misses, check.allowed) == (2, 2, 1)
    assert not check.calibrated


def test_a_correct_precision_rarely_fails_the_interval_check() -> None:
    """Without the pipeline: in 400 seeded worlds, Wilson intervals computed from each band's own draws
    contain its true precision (the band's mean risk) about 95% of the time, and the check's allowance
    fails well under 1% of the worlds (the integration tests show the pipeline reports exactly these counts)."""
    params = SimulationParams(days=2, entities=200, bad_input_rate=0)
    judged = missed = failed = 0
    for seed in range(400):
        accounts, _ = build_world(replace(params, seed=seed), START)
        units = [(a.score, a.risk, _result(a.entity_id, a.u_outcome >= 1 - a.risk)) for a in accounts if a.held_out]
        rows = [_row(b.band_low, b.band_high, b.held_out, b.n, b.positives) for b in band_tallies(units, EDGES10)]
        check = precision_check(band_tallies(units, EDGES10), rows)
        assert check.counts_equal
        judged, missed, failed = judged + check.judged, missed + check.misses, failed + (not check.calibrated)
    assert 0.93 <= 1 - missed / judged <= 0.97, missed / judged
    assert failed <= 4, failed  # <= 1% of 400


def test_the_world_is_fixed_by_its_seed() -> None:
    params = SimulationParams(days=3, entities=90, seed=11)
    first, bad_first = build_world(params, START)
    again, bad_again = build_world(params, START)
    other, _ = build_world(replace(params, seed=12), START)
    assert [a.document for a in first] == [a.document for a in again] and bad_first == bad_again
    assert [a.score for a in first] != [a.score for a in other]
    assert len({a.entity_id for a in first} | {a.entity_id for a in other}) == 180  # seeds never collide


def test_accounts_are_scored_once_a_cohort_a_day() -> None:
    params = SimulationParams(days=4, entities=10, bad_input_rate=0)
    accounts, bad = build_world(params, START)
    assert Counter(a.day for a in accounts) == {0: 3, 1: 3, 2: 2, 3: 2}
    assert bad == {}
    for a in accounts:
        tick = START + timedelta(days=a.day)
        predicted = datetime.fromisoformat(a.document["predicted_at"])
        assert tick - timedelta(hours=2) <= predicted < tick
        assert a.document["score"] == a.score == a.risk


def test_the_control_group_is_the_routers_own_assignment(tmp_path: Path) -> None:
    params = SimulationParams(days=2, entities=400, holdout=0.3, threshold=0.5, seed=5)
    accounts, _ = build_world(params, START)
    ruleset = write_rules(tmp_path / "rules", [params])
    for a in accounts:
        decisions = route(a.document, ruleset, now=START)
        assert [d.rule for d in decisions] == [RULE if a.matched else WATCH_RULE]
        assert decisions[0].held_out == a.held_out == (a.matched and in_holdout(RULE, "account", a.entity_id, 0.3))
        owner = a.owner.id
        assert decisions[0].owner == (owner if a.matched else "analytics-desk")
    held = sum(a.held_out for a in accounts) / sum(a.matched for a in accounts)
    assert 0.2 < held < 0.4


def test_drift_shifts_scores_from_its_day_but_not_the_risk() -> None:
    params = SimulationParams(days=4, entities=400, drift_from_day=2, drift_shift=0.2, bad_input_rate=0)
    accounts, _ = build_world(params, START)
    for a in accounts:
        assert a.score == (min(1.0, a.risk + 0.2) if a.day >= 2 else a.risk)


def test_bad_inputs_cycle_through_the_kinds_the_gate_rejects() -> None:
    params = SimulationParams(days=14, entities=600)
    accounts, bad = build_world(params, START)
    docs = [doc for day in sorted(bad) for doc in bad[day]]
    assert len(docs) == 12
    ids = {a.document["prediction_id"] for a in accounts}
    assert sum(not 0 <= d["score"] <= 1 for d in docs) == 3
    assert sum(d["entity_id"] == "" for d in docs) == 3
    assert sum(d["prediction_id"] in ids for d in docs) == 3  # duplicates resend a real prediction_id
    assert sum(datetime.fromisoformat(d["predicted_at"]) < START for d in docs) >= 3  # stale


def test_owner_delays_are_truncated_whole_seconds() -> None:
    rng = random.Random(3)
    delays = [_truncated_exponential(rng, 30.0, 1.0) for _ in range(2000)]
    assert all(timedelta(minutes=1) <= d <= timedelta(days=1) and d.microseconds == 0 for d in delays)
    assert statistics.fmean(d.total_seconds() for d in delays) < 12 * 3600  # truncation pulls a 30h mean in


def test_owner_truths_use_the_stats_definitions() -> None:
    t0 = START
    alerts = [
        AlertLog("a1", "e1", "ana-silva", t0, t0 + timedelta(hours=1), t0 + timedelta(hours=3)),
        AlertLog("a2", "e2", "ana-silva", t0, t0 + timedelta(hours=2), None),
        AlertLog("a3", "e3", "ana-silva", t0, None, None),
        AlertLog("a4", "e4", "ana-silva", t0, t0 + timedelta(hours=1), t0 + timedelta(hours=5)),
    ]
    (ana,) = [o for o in owner_truths(alerts, DEFAULT_OWNERS) if o.owner == "ana-silva"]
    assert (ana.alerts, ana.acknowledged, ana.intervened) == (4, 3, 2)
    assert ana.intervention_rate == 0.5 and ana.acknowledged_rate == 0.75
    assert ana.median_time_to_act_s == 4 * 3600  # the mean of the two middle values
    assert ana.median_time_to_ack_s == 3600
    assert ana.p90_time_to_act_s == 5 * 3600
    assert nearest_rank([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == 9 and nearest_rank([], 0.9) is None
    ben = next(o for o in owner_truths(alerts, DEFAULT_OWNERS) if o.owner == "ben-okafor")
    assert ben.alerts == 0 and ben.intervention_rate is None


def test_generated_rules_load_with_the_holdout_and_model_owner(tmp_path: Path) -> None:
    params = SimulationParams(holdout=0.45, threshold=0.3)
    ruleset = write_rules(tmp_path / "rules", [params])
    rule = next(r for r in ruleset.rules if r.name == RULE)
    assert rule.holdout == 0.45 and rule.ack_within == timedelta(days=1) and rule.act_within == timedelta(days=2)
    assert ruleset.model_owners["churn"] == "ml-platform"
    assert ruleset.models["churn"].drift.alpha == params.drift_alpha
    assert {o.id for o in DEFAULT_OWNERS} <= set(ruleset.owners)
    assert all(ruleset.owners[o.id].manager == "lead-retention" for o in DEFAULT_OWNERS)


def test_worlds_sharing_a_run_get_their_own_model_and_must_share_the_rule(tmp_path: Path) -> None:
    worlds = _distinct_models([SimulationParams(seed=1), SimulationParams(seed=2)])
    assert [w.model for w in worlds] == ["churn-s1", "churn-s2"]
    assert _distinct_models([SimulationParams(seed=1)])[0].model == "churn"
    ruleset = write_rules(tmp_path / "rules", worlds)
    assert set(ruleset.model_owners) == {"churn-s1", "churn-s2"}
    with pytest.raises(ValueError, match="holdout"):
        write_rules(
            tmp_path / "other", [SimulationParams(seed=1, model="a"), SimulationParams(seed=2, model="b", holdout=0.5)]
        )
    with pytest.raises(ValueError, match="seeds"):
        write_rules(tmp_path / "same", [SimulationParams(seed=1, model="a"), SimulationParams(seed=1, model="b")])
