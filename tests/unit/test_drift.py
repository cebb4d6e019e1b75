"""Drift maths against statistical tables, exact identities and seeded simulations."""

from __future__ import annotations

import math
import random

import pytest

from decision_router.drift import (
    DriftResult,
    category_drift_check,
    chi2_cdf,
    chi2_quantile,
    chi2_sf,
    drift_check,
    psi,
    psi_threshold,
    rate_jump,
    rate_jump_p_value,
)

# --- chi-squared -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "dof", "expected"),
    [
        (0.99, 9, 21.666),
        (0.95, 9, 16.919),
        (0.95, 1, 3.841),
        (0.99, 1, 6.635),
        (0.999, 1, 10.828),
        (0.95, 30, 43.773),
        (0.99, 100, 135.807),
        (0.01, 10, 2.558),
        (0.05, 2, 0.103),
        (0.5, 2, 2 * math.log(2)),
    ],
    ids=lambda v: str(v),
)
def test_chi2_quantile_matches_tables(p: float, dof: int, expected: float) -> None:
    assert chi2_quantile(p, dof) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("x", [1e-6, 0.1, 1.0, 3.841, 10.0, 40.0, 200.0])
def test_chi2_tails_match_closed_forms(x: float) -> None:
    # 1 dof: P(X > x) = erfc(sqrt(x/2)); 2 dof: P(X > x) = exp(-x/2). Relative accuracy deep
    # into the tail matters because alpha can be small.
    assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-12)
    assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-12)
    assert chi2_cdf(x, 2) == pytest.approx(-math.expm1(-x / 2), rel=1e-12)


@pytest.mark.parametrize("dof", [0.5, 1, 2, 3, 9, 19, 50, 1000])
@pytest.mark.parametrize("p", [1e-10, 0.001, 0.3, 0.5, 0.9, 0.99, 1 - 1e-10])
def test_chi2_quantile_inverts_cdf(p: float, dof: float) -> None:
    x = chi2_quantile(p, dof)
    if p <= 0.5:
        assert chi2_cdf(x, dof) == pytest.approx(p, rel=1e-9)
    else:
        assert chi2_sf(x, dof) == pytest.approx(1 - p, rel=1e-6)  # 1 - p itself is rounded


def test_chi2_rejects_bad_arguments() -> None:
    for p, dof in [(0.0, 1), (1.0, 1), (0.5, 0), (0.5, -1)]:
        with pytest.raises(ValueError):
            chi2_quantile(p, dof)


# --- PSI -------------------------------------------------------------------------------------------


def test_psi_of_identical_samples_is_zero() -> None:
    rng = random.Random(1)
    sample = [rng.gauss(0, 1) for _ in range(500)]
    assert psi(sample, list(sample)) == 0.0


def test_psi_hand_computed() -> None:
    # Reference 0..99: ten bins of ten. Recent: everything in the top half, 20 per bin.
    # Shares carry half a count per bin: e = 10.5/105 in every bin, a = 0.5/105 in the
    # five empty bins and 20.5/105 in the five full ones.
    reference = [float(v) for v in range(100)]
    recent = [float(v) for v in range(50, 100)] * 2
    e, empty, full = 10.5 / 105, 0.5 / 105, 20.5 / 105
    expected = 5 * (empty - e) * math.log(empty / e) + 5 * (full - e) * math.log(full / e)
    assert psi(reference, recent) == pytest.approx(expected, rel=1e-12)


def test_psi_grows_with_the_shift() -> None:
    rng = random.Random(2)
    reference = [rng.gauss(0, 1) for _ in range(2000)]
    values = [psi(reference, [rng.gauss(shift, 1) for _ in range(2000)]) for shift in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values)
    assert values[0] < 0.02 and values[-1] > 0.5  # no shift ~ noise; 1 sd ~ PSI 0.8


def test_psi_merges_bins_on_ties() -> None:
    # 50% zeros, 30% ones, 20% twos: quantile cuts collapse to {0, 1}, so three bins.
    reference = [0.0] * 50 + [1.0] * 30 + [2.0] * 20
    same = drift_check(reference, list(reference))
    assert (same.bins, same.psi) == (3, 0.0)
    moved = drift_check(reference, [0.0] * 20 + [1.0] * 30 + [2.0] * 50)
    assert moved.bins == 3 and moved.drifted is True


@pytest.mark.parametrize(
    ("n_reference", "n_recent"), [(49, 500), (500, 49), (0, 0)], ids=["small-reference", "small-recent", "empty"]
)
def test_psi_none_when_data_cannot_tell(n_reference: int, n_recent: int) -> None:
    rng = random.Random(3)
    reference = [rng.random() for _ in range(n_reference)]
    recent = [rng.random() for _ in range(n_recent)]
    assert psi(reference, recent) is None
    assert drift_check(reference, recent) == DriftResult(None, None, None, n_reference, n_recent, None)


@pytest.mark.parametrize("odd", [[0.0], [2.0], [0.0, 2.0]], ids=["below", "above", "both-sides"])
def test_a_constant_reference_that_starts_to_vary_is_drift(odd: list[float]) -> None:
    # A feature that was always 1 (a flag, a default) and now sometimes is not: its quantiles
    # are all one value, which used to leave one bin and no judgement at all.
    reference = [1.0] * 900
    still = drift_check(reference, [1.0] * 300, min_n=200)
    assert (still.bins, still.drifted) == (3, False)  # below, at and above 1
    assert still.psi < still.threshold / 10  # the empty bins add next to nothing
    varying = drift_check(reference, [1.0] * 284 + odd * (16 // len(odd)), min_n=200)  # 5% other values
    assert (varying.bins, varying.drifted) == (3, True)
    assert varying.threshold == psi_threshold(900, 300, 3)


def test_a_nearly_constant_reference_is_judged_by_its_share_of_the_top_value() -> None:
    # 95% ones, 5% zeros: every decile is 1, the maximum, so the cuts collapse too.
    reference = [1.0] * 855 + [0.0] * 45
    same = drift_check(reference, [1.0] * 285 + [0.0] * 15, min_n=200)
    assert (same.bins, same.drifted) == (3, False)
    halved = drift_check(reference, [1.0] * 150 + [0.0] * 150, min_n=200)
    assert (halved.bins, halved.drifted) == (3, True)
    # With missing values too, "missing" is one more bin.
    gaps = drift_check(reference, [1.0] * 256 + [0.0] * 14, min_n=200, reference_missing=100, recent_missing=30)
    assert gaps.bins == 4 and gaps.drifted is False


@pytest.mark.parametrize(("n", "share"), [(300, 0.97), (1000, 0.97), (1000, 0.995)])
def test_drift_check_false_alarm_rate_for_a_nearly_constant_variable(n: int, share: float) -> None:
    # The three bins around a dominant value must not fire on noise more often than alpha (1%).
    rng = random.Random(n + int(share * 1000))
    alarms = 0
    for _ in range(300):
        reference = [1.0 if rng.random() < share else rng.random() for _ in range(n)]
        recent = [1.0 if rng.random() < share else rng.random() for _ in range(n)]
        result = drift_check(reference, recent)
        assert result.bins == 3
        alarms += bool(result.drifted)
    assert alarms / 300 <= 0.02


def test_psi_rejects_nan_and_too_few_bins() -> None:
    with pytest.raises(ValueError):
        psi([math.nan] + [0.0] * 99, [0.0] * 100)
    with pytest.raises(ValueError):
        psi([0.0] * 100, [0.0] * 100, bins=1)


# --- threshold and drift check --------------------------------------------------------------------


def test_psi_threshold_formula() -> None:
    assert psi_threshold(100, 100) == pytest.approx((1 / 100 + 1 / 100) * 21.666, abs=1e-4)
    assert psi_threshold(1000, 250, bins=5, alpha=0.05) == pytest.approx((1 / 1000 + 1 / 250) * 9.488, abs=1e-5)
    assert psi_threshold(300, 7000) == psi_threshold(7000, 300)


def test_psi_threshold_shrinks_as_samples_grow() -> None:
    thresholds = [psi_threshold(n, n) for n in (50, 100, 1000, 10_000, 1_000_000)]
    assert thresholds == sorted(thresholds, reverse=True)
    assert thresholds[0] > 0.25 and thresholds[-1] < 0.001  # the fixed 0.1 / 0.25 is wrong at both ends


def test_psi_threshold_rejects_bad_arguments() -> None:
    for args in [(0, 100), (100, 0), (100, 100, 1), (100, 100, 10, 0.0)]:
        with pytest.raises(ValueError):
            psi_threshold(*args)


@pytest.mark.parametrize("n", [100, 5000], ids=["n=100", "n=5000"])
def test_drift_check_false_alarm_rate_under_no_drift(n: int) -> None:
    # PSI on quantile bins depends only on ranks, so uniform samples stand for any continuous
    # variable (and are quicker to draw than normal ones).
    rng = random.Random(n)
    alarms = 0
    for _ in range(200):
        result = drift_check([rng.random() for _ in range(n)], [rng.random() for _ in range(n)])
        alarms += bool(result.drifted)
    assert alarms / 200 <= 0.02


def test_drift_check_detects_half_sd_shift_at_1000() -> None:
    rng = random.Random(11)
    for _ in range(20):
        result = drift_check([rng.gauss(0, 1) for _ in range(1000)], [rng.gauss(0.5, 1) for _ in range(1000)])
        assert result.drifted is True
        assert result.psi > 3 * result.threshold


def test_drift_check_reports_sizes_and_bins() -> None:
    result = drift_check([float(v) for v in range(200)], [float(v) for v in range(80)])
    assert (result.n_reference, result.n_recent, result.bins) == (200, 80, 10)
    assert result.threshold == psi_threshold(200, 80)
    assert result.drifted is True  # all recent values sit in the bottom 40% of the reference



def _present(rng: random.Random, n: int, share: float) -> list[float]:
    return [rng.random() for _ in range(n) if rng.random() < share]


@pytest.mark.parametrize("share", [1.0, 0.5, 0.1], ids=["gone", "half-gone", "mostly-gone"])
def test_drift_check_counts_missing_values_as_a_bin(share: float) -> None:
    # Every reference unit had a value; recently only `share` of them do. Without the "missing"
    # bin the values left look alike (or are too few) and the loss would go unseen.
    rng = random.Random(21)
    reference = [rng.random() for _ in range(900)]
    recent_values = _present(rng, 300, 1 - share)
    result = drift_check(reference, recent_values, min_n=200, recent_missing=300 - len(recent_values))
    assert (result.n_reference, result.n_recent, result.bins) == (900, 300, 11)
    assert result.drifted is True and result.threshold == psi_threshold(900, 300, 11)


def test_drift_check_missing_values_alone_are_compared_by_share() -> None:
    # Too few reference values (45 of 900) for quantiles: one bin of values, one of missing ones.
    reference, stable, gone = [0.5] * 45, [0.7] * 15, [0.7] * 2  # where values lie is not compared
    same = drift_check(reference, stable, min_n=200, reference_missing=855, recent_missing=285)
    assert (same.bins, same.drifted) == (2, False)  # 5% present in both
    fewer = drift_check(reference, gone, min_n=200, reference_missing=855, recent_missing=298)
    assert (fewer.bins, fewer.drifted) == (2, True)  # 0.7% against 5% (15 expected, 2 seen)
    for kwargs in [{"reference_missing": -1}, {"recent_missing": -1}]:
        with pytest.raises(ValueError):
            drift_check([0.5] * 300, [0.5] * 300, **kwargs)


def test_drift_check_false_alarm_rate_with_missing_values_under_no_drift() -> None:
    rng = random.Random(23)
    alarms = 0
    for _ in range(200):
        reference, recent = _present(rng, 1000, 0.6), _present(rng, 1000, 0.6)
        result = drift_check(reference, recent, reference_missing=1000 - len(reference),
                             recent_missing=1000 - len(recent))
        assert result.bins == 11
        alarms += bool(result.drifted)
    assert alarms / 200 <= 0.02


# --- categories -------------------------------------------------------------------------------------

SEGMENTS = [f"segment-{i}" for i in range(15)]
ZIPF = [1 / (i + 1) for i in range(15)]  # 15 categories: 9 get a bin, 6 share "other"


@pytest.mark.parametrize("n", [300, 1000], ids=["n=300", "n=1000"])
def test_category_drift_check_false_alarm_rate_under_no_drift(n: int) -> None:
    rng = random.Random(n + 1)
    alarms = 0
    for _ in range(300):
        result = category_drift_check(rng.choices(SEGMENTS, ZIPF, k=n), rng.choices(SEGMENTS, ZIPF, k=n))
        assert result.bins == 10  # 9 categories and "other"
        alarms += bool(result.drifted)
    assert alarms / 300 <= 0.02


def test_category_drift_check_flags_a_shift_and_a_new_category() -> None:
    rng = random.Random(31)
    reference = rng.choices(SEGMENTS, ZIPF, k=1000)
    assert category_drift_check(reference, rng.choices(SEGMENTS, ZIPF, k=1000)).drifted is False
    # The top segment's share goes from about 30% to about 45%.
    heavier = [ZIPF[0] * 2, *ZIPF[1:]]
    shifted = category_drift_check(reference, rng.choices(SEGMENTS, heavier, k=1000))
    assert shifted.drifted is True and shifted.psi > shifted.threshold == psi_threshold(1000, 1000, 10)
    # 10% of recent values are a category the reference never had: common enough over both
    # windows to get a bin of its own. (At 5% it would join "other", 13% of values here, and
    # at 1000 per sample that is within noise.)
    novel = rng.choices(SEGMENTS, ZIPF, k=900) + ["segment-new"] * 100
    assert category_drift_check(reference, novel).drifted is True


def test_category_drift_check_constant_missing_and_too_few() -> None:
    same = category_drift_check(["gold"] * 900, ["gold"] * 300, min_n=200)
    assert (same.bins, same.drifted) == (2, False)  # "gold" and "other"
    assert category_drift_check(["gold"] * 900, ["gold"] * 270 + ["silver"] * 30, min_n=200).drifted is True
    gone = category_drift_check(["gold"] * 900, ["gold"] * 30, min_n=200, recent_missing=270)
    assert (gone.bins, gone.drifted, gone.n_recent) == (3, True, 300)
    assert category_drift_check(["gold"] * 900, ["gold"] * 150, min_n=200) == DriftResult(
        None, None, None, 900, 150, None
    )
    with pytest.raises(ValueError):
        category_drift_check(["gold"] * 300, ["gold"] * 300, bins=1)


# --- rate jump -------------------------------------------------------------------------------------


def test_rate_jump_p_value_is_fishers_exact_test() -> None:
    # Fisher's tea-tasting: 3 of 4 milk-first cups picked right, one-sided p = 17/70.
    assert rate_jump_p_value(1, 4, 3, 4, min_n=1) == pytest.approx(17 / 70, rel=1e-12)
    # One event ever, and it fell among 50 of 1050 units: p = 50/1050.
    assert rate_jump_p_value(0, 1000, 1, 50) == pytest.approx(50 / 1050, rel=1e-12)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((10, 1000, 25, 1000), True),  # 1% -> 2.5%
        ((10, 1000, 15, 1000), False),  # 1% -> 1.5%: could be noise at this size
        ((0, 1000, 1, 50), False),  # a single rare event is not a jump
        ((0, 1000, 5, 50), True),  # five are
        ((50, 1000, 20, 1000), False),  # lower is never a jump
        ((0, 1000, 0, 100), False),
        ((100, 100, 100, 100), False),
        ((10, 1000, 25, 29), None),  # too few recent units
        ((1, 29, 25, 1000), None),  # too few reference units
    ],
    ids=["doubling", "small-rise", "one-rare-event", "five-rare-events", "drop", "no-events", "all-events",
         "small-recent", "small-reference"],
)
def test_rate_jump(counts: tuple[int, int, int, int], expected: bool | None) -> None:
    assert rate_jump(*counts) is expected


def test_rate_jump_false_alarm_rate_under_no_change() -> None:
    rng = random.Random(5)
    alarms = 0
    for _ in range(200):
        reference = sum(rng.random() < 0.02 for _ in range(2000))
        recent = sum(rng.random() < 0.02 for _ in range(500))
        alarms += bool(rate_jump(reference, 2000, recent, 500))
    assert alarms / 200 <= 0.02


def test_rate_jump_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        rate_jump(11, 10, 0, 100)
    with pytest.raises(ValueError):
        rate_jump(1, 100, 1, 100, alpha=1.0)
