"""Uplift maths against published values, exact identities and seeded simulations."""

from __future__ import annotations

import math
import random

import pytest

from decision_router.uplift import (
    ScoreBand,
    UpliftEstimate,
    estimate_uplift,
    newcombe_difference,
    sample_ratio_mismatch,
    score_band_precision,
    sequential_difference_interval,
    wilson_interval,
)

# --- Wilson ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (81, 263, (0.2553, 0.3662)),  # Newcombe 1998a, Table I, method 3
        (15, 148, (0.0624, 0.1605)),  # Newcombe 1998a
        (0, 20, (0.0, 0.1611)),  # Newcombe 1998a
        (1, 29, (0.0061, 0.1718)),  # Newcombe 1998a
    ],
    ids=["81/263", "15/148", "0/20", "1/29"],
)
def test_wilson_published_values(successes: int, n: int, expected: tuple[float, float]) -> None:
    interval = wilson_interval(successes, n)
    assert interval == pytest.approx(expected, abs=5e-5)


def test_wilson_none_without_data_and_errors_on_bad_counts() -> None:
    assert wilson_interval(0, 0) is None
    for successes, n in [(-1, 5), (6, 5), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(successes, n)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


@pytest.mark.parametrize(("successes", "n"), [(0, 1), (3, 10), (10, 10), (81, 263)])
def test_wilson_is_symmetric_in_successes_and_failures(successes: int, n: int) -> None:
    low, high = wilson_interval(successes, n)
    mirror_low, mirror_high = wilson_interval(n - successes, n)
    assert (low, high) == pytest.approx((1 - mirror_high, 1 - mirror_low), abs=1e-12)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_widens_with_confidence() -> None:
    low90, high90 = wilson_interval(30, 100, 0.90)
    low99, high99 = wilson_interval(30, 100, 0.99)
    assert low99 < low90 < 0.3 < high90 < high99


# --- Newcombe difference -----------------------------------------------------------------------

# Newcombe 1998b, Table II, method 10 (hybrid score, no continuity correction). These examples
# have fewer than 10 per group, hence min_n=1.
NEWCOMBE_1998B = [
    ((56, 70, 48, 80), (0.2000, 0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.6000, 0.1705, 0.8090)),
    ((6, 7, 2, 7), (0.5714, 0.0582, 0.8062)),
    ((5, 56, 0, 29), (0.0893, -0.0381, 0.1926)),
]


@pytest.mark.parametrize(("counts", "expected"), NEWCOMBE_1998B, ids=["56/70-48/80", "9/10-3/10", "6/7-2/7", "5/56-0/29"])
def test_newcombe_published_values(counts: tuple[int, int, int, int], expected: tuple[float, float, float]) -> None:
    assert newcombe_difference(*counts, min_n=1) == pytest.approx(expected, abs=5e-5)


def test_style_guide_example_uplift_is_ten_points_and_not_distinguishable_from_zero() -> None:
    uplift, low, high = newcombe_difference(10, 40, 6, 40)
    assert uplift == pytest.approx(0.10, abs=1e-12)
    # Same numbers from statsmodels' confint_proportions_2indep(method="newcomb").
    assert (low, high) == pytest.approx((-0.0775, 0.2714), abs=5e-5)


@pytest.mark.parametrize(
    ("counts", "min_n"),
    [((5, 9, 5, 40), 10), ((5, 40, 0, 9), 10), ((0, 0, 3, 40), 10), ((5, 19, 5, 40), 20)],
    ids=["treated-9", "control-9", "treated-empty", "custom-min"],
)
def test_newcombe_none_below_minimum(counts: tuple[int, int, int, int], min_n: int) -> None:
    assert newcombe_difference(*counts, min_n=min_n) is None


@pytest.mark.parametrize("counts", [(10, 40, 6, 40), (0, 25, 25, 25), (17, 300, 3, 31), (56, 70, 48, 80)])
def test_newcombe_symmetries(counts: tuple[int, int, int, int]) -> None:
    s1, n1, s2, n2 = counts
    d, low, high = newcombe_difference(s1, n1, s2, n2)
    swapped = newcombe_difference(s2, n2, s1, n1)
    failures = newcombe_difference(n1 - s1, n1, n2 - s2, n2)
    assert swapped == pytest.approx((-d, -high, -low), abs=1e-12)
    assert failures == pytest.approx((-d, -high, -low), abs=1e-12)
    assert -1.0 <= low <= d <= high <= 1.0


def test_fixed_interval_covers_true_difference_in_simulation() -> None:
    rng = random.Random(20261125)
    covered = 0
    for _ in range(400):
        s1 = sum(rng.random() < 0.3 for _ in range(200))
        s2 = sum(rng.random() < 0.2 for _ in range(200))
        _, low, high = newcombe_difference(s1, 200, s2, 200)
        covered += low <= 0.1 <= high
    assert covered / 400 >= 0.93


# --- always-valid interval ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "counts",
    [(10, 40, 6, 40), (0, 10, 0, 10), (10, 10, 0, 10), (56, 70, 48, 80), (90, 900, 5, 100), (400, 1000, 380, 1000),
     (3, 5000, 0, 500)],
    ids=["style-guide", "all-zero", "all-vs-none", "newcombe", "unbalanced", "large", "rare"],
)
def test_sequential_contains_fixed_interval_and_stays_in_range(counts: tuple[int, int, int, int]) -> None:
    _, fixed_low, fixed_high = newcombe_difference(*counts)
    low, high = sequential_difference_interval(*counts)
    assert -1.0 <= low <= fixed_low and fixed_high <= high <= 1.0


@pytest.mark.parametrize("n", [20, 100, 500, 2000])
def test_sequential_is_clearly_wider_than_fixed(n: int) -> None:
    # The price of being allowed to look at any time: about 1.5x the fixed width near the
    # planned size, more away from it.
    s1, s2 = round(0.3 * n), round(0.2 * n)
    _, fixed_low, fixed_high = newcombe_difference(s1, n, s2, n)
    low, high = sequential_difference_interval(s1, n, s2, n)
    assert high - low > 1.3 * (fixed_high - fixed_low)


def test_sequential_shrinks_as_data_accrue_and_is_centred_on_the_difference() -> None:
    widths = []
    for n in (50, 100, 400, 1600, 6400):
        low, high = sequential_difference_interval(round(0.3 * n), n, round(0.2 * n), n)
        assert (low + high) / 2 == pytest.approx(0.1, abs=1e-9)
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)


def test_sequential_none_below_minimum_and_errors() -> None:
    assert sequential_difference_interval(5, 9, 5, 40) is None
    assert sequential_difference_interval(5, 40, 5, 40, min_n=50) is None
    with pytest.raises(ValueError):
        sequential_difference_interval(5, 40, 5, 40, alpha=0.0)
    with pytest.raises(ValueError):
        sequential_difference_interval(5, 40, 5, 40, planned_n=0)


def test_sequential_planned_n_trades_early_width_for_late_width() -> None:
    early_tuned = sequential_difference_interval(30, 100, 20, 100, planned_n=200)
    late_tuned = sequential_difference_interval(30, 100, 20, 100, planned_n=20000)
    assert early_tuned[1] - early_tuned[0] < late_tuned[1] - late_tuned[0]


def _peeking_false_alarms(rng: random.Random, p: float, runs: int) -> tuple[int, int]:
    """Runs (of `runs`) in which some look at a true zero difference excluded 0."""
    sequential = fixed = 0
    for _ in range(runs):
        s1 = s2 = 0
        seq_alarm = fixed_alarm = False
        for look in range(1, 21):  # every 20 per arm, up to 400 per arm
            s1 += sum(rng.random() < p for _ in range(20))
            s2 += sum(rng.random() < p for _ in range(20))
            n = 20 * look
            low, high = sequential_difference_interval(s1, n, s2, n)
            seq_alarm |= not low <= 0.0 <= high
            _, low, high = newcombe_difference(s1, n, s2, n)
            fixed_alarm |= not low <= 0.0 <= high
        sequential += seq_alarm
        fixed += fixed_alarm
    return sequential, fixed


def test_daily_looks_inflate_fixed_interval_false_alarms_but_not_sequential() -> None:
    sequential, fixed = _peeking_false_alarms(random.Random(7), p=0.3, runs=200)
    assert sequential / 200 <= 0.10
    # Checked 20 times, the fixed 95% interval "finds" an effect that is not there in about
    # a quarter of runs (measured 27%): the reason the always-valid interval exists.
    assert fixed / 200 >= 0.15
    assert fixed >= 3 * max(sequential, 1)


def test_sequential_holds_with_unbalanced_holdout_arriving_one_unit_at_a_time() -> None:
    rng = random.Random(8)
    alarms = 0
    for _ in range(200):
        s1 = n1 = s2 = n2 = 0
        alarm = False
        for unit in range(1, 2001):
            outcome = rng.random() < 0.3
            if rng.random() < 0.9:  # holdout 10%
                n1, s1 = n1 + 1, s1 + outcome
            else:
                n2, s2 = n2 + 1, s2 + outcome
            if unit % 100 == 0:
                interval = sequential_difference_interval(s1, n1, s2, n2)
                alarm |= interval is not None and not interval[0] <= 0.0 <= interval[1]
        alarms += alarm
    assert alarms / 200 <= 0.10


# --- estimate ------------------------------------------------------------------------------------


def test_estimate_uplift_style_guide_example() -> None:
    est = estimate_uplift(10, 40, 6, 40)
    assert est.enough_data
    assert (est.treated_rate, est.control_rate) == (0.25, 0.15)
    assert est.uplift == pytest.approx(0.10, abs=1e-12)
    assert (est.ci_low, est.ci_high) == pytest.approx((-0.0775, 0.2714), abs=5e-5)
    assert est.seq_low < est.ci_low and est.ci_high < est.seq_high


@pytest.mark.parametrize(
    ("counts", "rates"),
    [((3, 8, 6, 40), (0.375, 0.15)), ((0, 0, 6, 40), (None, 0.15)), ((0, 0, 0, 0), (None, None))],
    ids=["small-treated", "empty-treated", "empty-both"],
)
def test_estimate_uplift_not_enough_data(counts: tuple[int, int, int, int], rates: tuple[float | None, ...]) -> None:
    est = estimate_uplift(*counts)
    assert est == UpliftEstimate(*counts, *rates, None, None, None, None, None, enough_data=False)


# --- sample ratio mismatch ---------------------------------------------------------------------


def test_srm_flags_a_60_40_split_but_not_503_497() -> None:
    bad = sample_ratio_mismatch(400, 1000, 0.5)
    assert bad.chi_square == pytest.approx(40.0)
    assert bad.p_value == pytest.approx(math.erfc(math.sqrt(20.0)))
    assert bad.mismatch is True
    fine = sample_ratio_mismatch(497, 1000, 0.5)
    assert fine.chi_square == pytest.approx(0.036)
    assert fine.p_value == pytest.approx(0.8495, abs=1e-4)
    assert fine.mismatch is False


def test_srm_with_a_ten_percent_holdout() -> None:
    assert sample_ratio_mismatch(100, 1000, 0.1).mismatch is False
    assert sample_ratio_mismatch(60, 1000, 0.1).mismatch is True  # chi2 = 17.8, p = 2.5e-5


@pytest.mark.parametrize(
    ("control_n", "total_n", "fraction"),
    [(5, 19, 0.5), (0, 100, 0.0), (100, 100, 1.0), (1, 100, 0.01)],
    ids=["too-few", "no-holdout", "all-holdout", "expected-count-below-5"],
)
def test_srm_not_applicable(control_n: int, total_n: int, fraction: float) -> None:
    result = sample_ratio_mismatch(control_n, total_n, fraction)
    assert (result.chi_square, result.p_value, result.mismatch, result.applicable) == (None, None, None, False)


def test_srm_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        sample_ratio_mismatch(11, 10, 0.5)
    with pytest.raises(ValueError):
        sample_ratio_mismatch(1, 10, 1.5)


# --- score-band precision ----------------------------------------------------------------------


def test_score_band_precision_counts_each_band() -> None:
    records = [(0.05, False), (0.1, True), (0.15, False), (0.95, True), (0.99, True), (1.0, False)]
    bands = score_band_precision(records)
    assert len(bands) == 10
    assert bands[0] == ScoreBand(0.0, 0.1, 1, 0, 0.0, wilson_interval(0, 1))
    assert bands[1] == ScoreBand(0.1, 0.2, 2, 1, 0.5, wilson_interval(1, 2))  # 0.1 opens band 2
    assert bands[9] == ScoreBand(0.9, 1.0, 3, 2, 2 / 3, wilson_interval(2, 3))  # 1.0 closes the last
    assert all(b.n == 0 and b.precision is None and b.ci is None for b in bands[2:9])


def test_score_band_precision_custom_edges_skip_scores_outside() -> None:
    bands = score_band_precision([(0.2, True), (0.85, True), (0.9, False)], edges=[0.8, 0.9, 1.0], confidence=0.9)
    assert [(b.low, b.high, b.n, b.positives) for b in bands] == [(0.8, 0.9, 1, 1), (0.9, 1.0, 1, 0)]
    assert bands[0].ci == wilson_interval(1, 1, 0.9)


@pytest.mark.parametrize("edges", [[0.5], [0.0, 0.5, 0.5, 1.0], [1.0, 0.0]])
def test_score_band_precision_rejects_bad_edges(edges: list[float]) -> None:
    with pytest.raises(ValueError):
        score_band_precision([], edges=edges)


# --- against an independent, textbook implementation --------------------------------------------

Z95 = 1.959963984540054  # the 97.5% normal quantile, written out (not from the module)


def textbook_wilson(s: int, n: int) -> tuple[float, float]:
    """Wilson (1927) in the closed form of Newcombe 1998a, eq. for method 3."""
    p = s / n
    root = Z95 * math.sqrt(Z95 * Z95 + 4 * n * p * (1 - p))
    return (2 * n * p + Z95 * Z95 - root) / (2 * (n + Z95 * Z95)), (2 * n * p + Z95 * Z95 + root) / (2 * (n + Z95 * Z95))


def textbook_newcombe(s1: int, n1: int, s2: int, n2: int) -> tuple[float, float, float]:
    (l1, u1), (l2, u2) = textbook_wilson(s1, n1), textbook_wilson(s2, n2)
    p1, p2 = s1 / n1, s2 / n2
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


EDGE_SIZES = [(10, 10), (10, 11), (11, 10), (13, 40), (40, 13), (57, 19)]


@pytest.mark.parametrize(("n1", "n2"), EDGE_SIZES)
def test_newcombe_equals_the_textbook_formula_on_every_count(n1: int, n2: int) -> None:
    """Every success count at sizes at and just above the "not enough data" threshold, 0% and 100% included."""
    for s1 in range(n1 + 1):
        for s2 in range(n2 + 1):
            d, low, high = newcombe_difference(s1, n1, s2, n2)
            expected = textbook_newcombe(s1, n1, s2, n2)
            assert d == expected[0]
            assert low == pytest.approx(expected[1], abs=1e-12) and high == pytest.approx(expected[2], abs=1e-12)


def test_wilson_is_exactly_0_and_1_at_0_of_n_and_n_of_n() -> None:
    """Computed, these limits come out a rounding error off (0/10: 2.8e-17; 13/13: 0.9999999999999999)."""
    assert [n for n in range(1, 201) if wilson_interval(0, n)[0] != 0.0] == []
    assert [n for n in range(1, 201) if wilson_interval(n, n)[1] != 1.0] == []


@pytest.mark.parametrize(("n1", "n2"), EDGE_SIZES)
def test_intervals_stay_in_range_and_the_always_valid_one_contains_the_fixed_one(n1: int, n2: int) -> None:
    """At 0% vs 100% the computed fixed interval went a rounding error past -1 or 1, outside the clipped
    always-valid one (0/10 vs 40/40: fixed low -1.0000000000000002, always-valid low -1.0)."""
    for s1 in range(n1 + 1):
        for s2 in range(n2 + 1):
            _, fixed_low, fixed_high = newcombe_difference(s1, n1, s2, n2)
            low, high = sequential_difference_interval(s1, n1, s2, n2)
            assert -1.0 <= low <= fixed_low <= fixed_high <= high <= 1.0, (s1, n1, s2, n2)


@pytest.mark.parametrize(("tn", "cn", "enough"), [(9, 10, False), (10, 9, False), (10, 10, True), (9, 9, False)])
def test_not_enough_data_exactly_below_ten_units_in_either_group(tn: int, cn: int, enough: bool) -> None:
    est = estimate_uplift(tn // 2, tn, cn // 3, cn)
    assert est.enough_data is enough
    assert (est.uplift is None) is (not enough) and (est.seq_low is None) is (not enough)
    assert est.treated_rate == (tn // 2) / tn and est.control_rate == (cn // 3) / cn


@pytest.mark.parametrize(("control", "total", "fraction"), [(400, 1000, 0.5), (210, 1000, 0.3), (97, 1000, 0.1),
                                                             (5, 20, 0.25)])
def test_srm_p_value_equals_the_textbook_chi_squared(control: int, total: int, fraction: float) -> None:
    expected_c, expected_t = total * fraction, total * (1 - fraction)
    x = (control - expected_c) ** 2 / expected_c + (total - control - expected_t) ** 2 / expected_t
    # 1 degree of freedom: P(chi2 > x) = P(|N(0,1)| > sqrt(x)) = 2 (1 - Phi(sqrt(x)))
    p = 2 * (1 - 0.5 * (1 + math.erf(math.sqrt(x) / math.sqrt(2))))
    result = sample_ratio_mismatch(control, total, fraction)
    assert result.p_value == pytest.approx(p, rel=1e-6, abs=1e-15)
    assert result.mismatch is (p < 0.001)
